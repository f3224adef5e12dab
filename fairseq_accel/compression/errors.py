"""Errors of the compression options and state, each one line naming the option or parameter."""
from typing import Dict, Optional

import torch
from torch import Tensor


class CompressionOptionError(ValueError):
    """A compression option that cannot work (out of range, contradicting another, or matching nothing)."""


class CompressionStateError(ValueError):
    """Compression state in a checkpoint that does not fit the model it is loaded into."""


def check_state_fits(what: str, stored: "Dict[str, Tensor]", shapes: "Dict[str, torch.Size]", source: Optional[str]) -> None:
    """Raise :class:`CompressionStateError` unless ``stored`` has a tensor of the right shape for exactly
    the weights in ``shapes`` (``what``: e.g. "sparsity masks"; ``source``: the checkpoint, if known)."""
    where = source or "the checkpoint"
    if set(stored) != set(shapes):
        missing, unknown = sorted(set(shapes) - set(stored)), sorted(set(stored) - set(shapes))
        raise CompressionStateError(
            f"{what} in {where} do not fit the model's compression scope (missing: {missing[:3]}, unknown: "
            f"{unknown[:3]}): were the --sparsity-* / --compress-* options changed between runs?"
        )
    for name, value in stored.items():
        if tuple(value.shape) != tuple(shapes[name]):
            raise CompressionStateError(
                f"{what} of {name} in {where} has shape {tuple(value.shape)}, the model's weight {tuple(shapes[name])}"
            )
