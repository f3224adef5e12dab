"""Type aliases of the dictionaries fairseq passes between encoder, decoder and generator.

* ``EncoderOut``: fairseq's encoder-output dict (``encoder_out``: ``[T x B x C]``, ``encoder_padding_mask``:
  ``[B x T]`` or an empty list, ...), every value a list of tensors so that TorchScript can type it.
* ``IncrementalState``: the per-module caches of incremental decoding, keyed by each module's
  ``with_incremental_state`` id, then by the cache entry's name.
"""
from typing import Dict, List, Optional

from torch import Tensor

EncoderOut = Dict[str, List[Tensor]]
IncrementalState = Dict[str, Dict[str, Optional[Tensor]]]
