"""Position-wise layers on the valid frames of a padded batch only ("remove padding").

FasterTransformer's effective transformer (NVIDIA, "remove padding") and ByteDance's effective_transformer pack
the tokens of a padded batch into one dense matrix for everything that works frame by frame (projections,
feed-forward, norms) and scatter them back into the padded layout only where frames meet (attention, the FSMN
window). Speech batches hold utterances of several-fold different lengths, so a large share of a padded batch's
rows are padding: packing skips their matrix products.
"""
from typing import Optional

import torch
from torch import Tensor


class ValidFrames:
    """Where the valid frames of a ``(batch, time)`` padding mask lie; packs and unpacks tensors accordingly."""

    def __init__(self, padding: Tensor):
        self.padding = padding  # (batch, time), True at padding
        self.batch, self.time = padding.shape
        self.index = (~padding).reshape(-1).nonzero().squeeze(1)  # positions in the flattened batch x time

    @classmethod
    def of(cls, padding: Optional[Tensor]) -> Optional["ValidFrames"]:
        """The valid frames of ``padding``; None where there is no padding (nothing to remove)."""
        return None if padding is None or not bool(padding.any()) else cls(padding)

    def pack(self, x: Tensor) -> Tensor:
        """(batch, time, ...) -> (valid frames, ...), in batch-major order."""
        return x.reshape(self.batch * self.time, *x.shape[2:]).index_select(0, self.index)

    def unpack(self, x: Tensor) -> Tensor:
        """(valid frames, ...) -> (batch, time, ...), zeros at padding."""
        padded = x.new_zeros(self.batch * self.time, *x.shape[1:])
        return padded.index_copy_(0, self.index, x).view(self.batch, self.time, *x.shape[1:])
