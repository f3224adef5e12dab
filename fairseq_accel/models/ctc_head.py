"""The CTC head of an encoder-decoder speech model, as fairseq 0.12's ``s2t_transformer`` defines it.

fairseq 0.12's stock ``S2TTransformerEncoder`` already carries an optional CTC head: it builds
``encoder.ctc_proj = Linear(encoder_embed_dim, len(tgt_dict))`` when ``args.ctc_weight > 0``, and its
decoder (``TransformerDecoderScriptable``) returns the encoder output as ``net_output[1]["encoder_out"]``
outside incremental decoding; ``S2TTransformerModel.get_ctc_output`` reads both. The
``joint_ctc_attention`` criterion relies on exactly that contract; any model that keeps it trains with
that criterion (the plugin's speech models subclass ``S2TTransformerModel`` and so inherit
``get_ctc_output``; their encoders build the head with :func:`build_ctc_head`):

* the head is ``encoder.ctc_proj``, built by :func:`build_ctc_head` only when ``args.ctc_weight > 0``
  (``args.tgt_dict_size``, set by ``S2TTransformerModel.build_model``, is the output size).
  ``--ctc-weight`` is a criterion option, but fairseq-train hands the whole argument namespace to models
  configured through ``add_args``, and the checkpoint stores it as the model's config: a model trained
  with CTC therefore rebuilds its head in ``fairseq-generate`` and loads strictly, and a model trained
  without CTC has no head and no extra parameters;
* the decoder's extra output holds ``encoder_out`` (the encoder's fairseq dict: ``encoder_out`` T x B x C,
  ``encoder_padding_mask`` B x T, an empty list when nothing is padded) when not decoding incrementally;
* the CTC blank is the dictionary's ``<s>`` (index 0): it never occurs in a target, and it is what fairseq's
  ``ctc`` criterion (without a blank symbol) and ``F.ctc_loss`` use by default.
"""
from __future__ import annotations

from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fairseq_accel.modules.encoder_decoder_types import EncoderOut


class CTCHeadError(ValueError):
    """A model does not provide what CTC training needs; the message says what is missing."""


def build_ctc_head(args: Any, encoder_dim: int, vocab_size: int) -> Optional[nn.Linear]:
    """``Linear(encoder_dim, vocab_size)`` when ``args.ctc_weight > 0``, else None (the stock switch).

    An encoder assigns the result to ``self.ctc_proj``.
    """
    if getattr(args, "ctc_weight", 0.0) > 0.0:
        return nn.Linear(encoder_dim, vocab_size)
    return None


def find_ctc_head(model: nn.Module) -> nn.Module:
    """The model's ``encoder.ctc_proj``; :class:`CTCHeadError` if it has none."""
    head = getattr(getattr(model, "encoder", None), "ctc_proj", None)
    if head is None:
        raise CTCHeadError(
            f"model {type(model).__name__} has no CTC head (encoder.ctc_proj): joint CTC training needs "
            "an encoder that builds one when --ctc-weight > 0, as fairseq's s2t_transformer does "
            "(fairseq_accel.models.ctc_head.build_ctc_head builds it the same way)"
        )
    return head


def encoder_out_of(net_output: Tuple[Tensor, Optional[Dict[str, Any]]]) -> EncoderOut:
    """The encoder output a decoder returned in ``net_output[1]["encoder_out"]``."""
    extra = net_output[1] if len(net_output) > 1 else None
    encoder_out = extra.get("encoder_out") if isinstance(extra, dict) else None
    if not isinstance(encoder_out, dict):
        raise CTCHeadError(
            "the decoder did not return the encoder output in net_output[1]['encoder_out'] (as "
            "fairseq's speech_to_text TransformerDecoderScriptable does); the CTC head needs it"
        )
    return encoder_out


def ctc_log_probs(ctc_proj: nn.Module, encoder_out: EncoderOut) -> Tuple[Tensor, Tensor]:
    """CTC log-probabilities (T x B x V, float32) and valid frames per sentence (B,).

    The lengths come from ``encoder_padding_mask`` (B x T, True at padding; an empty list means no
    padding), fairseq's convention for encoder outputs.
    """
    if "encoder_padding_mask" not in encoder_out:
        raise CTCHeadError(
            "the encoder output has no 'encoder_padding_mask' entry, so the number of valid frames "
            "per sentence is unknown; return it (an empty list when nothing is padded) as fairseq "
            "encoders do"
        )
    features = encoder_out["encoder_out"][0]
    lprobs = F.log_softmax(ctc_proj(features).float(), dim=-1)
    frames, batch = features.shape[:2]
    lengths = torch.full((batch,), frames, dtype=torch.long, device=features.device)
    padding = encoder_out["encoder_padding_mask"]
    if len(padding) > 0:
        lengths = lengths - padding[0].long().sum(dim=-1)
    return lprobs, lengths


class CTCBestPath(NamedTuple):
    """One sentence's CTC best path: the tokens left after merging repeats and dropping blanks, and per token
    the highest frame log-probability among the frames it was read from."""

    tokens: List[int]
    scores: List[float]


def ctc_best_paths(lprobs: Tensor, lengths: Tensor, blank: int) -> List[CTCBestPath]:
    """Greedy (best path) CTC decoding: argmax per frame over each sentence's valid frames, runs of the same
    symbol merged, blanks dropped (a blank between two equal symbols keeps both).

    ``lprobs``: T x B x V log-probabilities; ``lengths``: valid frames per sentence (B,).
    """
    best_scores, best = lprobs.max(dim=-1)
    paths = []
    for frames, scores, length in zip(best.t().cpu(), best_scores.t().float().cpu(), lengths.tolist()):
        runs, run_lengths = torch.unique_consecutive(frames[:length], return_counts=True)
        run_of_frame = torch.repeat_interleave(torch.arange(len(runs)), run_lengths)
        run_scores = torch.full((len(runs),), float("-inf")).scatter_reduce(0, run_of_frame, scores[:length], "amax")
        kept = runs.ne(blank)
        paths.append(CTCBestPath(runs[kept].tolist(), run_scores[kept].tolist()))
    return paths
