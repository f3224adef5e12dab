"""Symmetric per-output-channel integer grids for weights (design.md §5: "symmetric per-output-channel").

Row ``r`` of a weight matrix ``[out, in]`` gets the scale ``max|W[r]| / qmax`` with ``qmax = 2**(bits-1) - 1``
(127 for int8, 7 for int4), so its largest weight lands on ``±qmax`` exactly and zeros stay zeros. A weight
already on its grid projects onto itself, which lets the compressor store ADMM-finalized weights losslessly.
"""
import torch
from torch import Tensor

#: Bit widths the grids (and ``--admm-bits``) support.
SUPPORTED_BITS = (8, 4)


def largest_level(bits: int) -> int:
    """``qmax``: the largest integer level of a symmetric ``bits``-bit grid."""
    return 2 ** (bits - 1) - 1


def channel_scales(weight: Tensor, bits: int) -> Tensor:
    """One scale per output row (shape ``[out, 1]``); an all-zero row gets scale 1 (any scale keeps it 0)."""
    peak = weight.detach().abs().flatten(1).amax(dim=1, keepdim=True)
    scales = peak / largest_level(bits)
    return torch.where(peak > 0, scales, torch.ones_like(scales)).view(weight.shape[0], *([1] * (weight.dim() - 1)))


def quantize_to_levels(weight: Tensor, bits: int) -> "tuple[Tensor, Tensor]":
    """The integer levels (as int8) and the ``[out, 1]`` scales of ``weight``'s nearest grid point."""
    scales = channel_scales(weight, bits)
    qmax = largest_level(bits)
    levels = torch.round(weight.detach() / scales).clamp_(-qmax, qmax)
    return levels.to(torch.int8), scales


def project_to_grid(weight: Tensor, bits: int) -> Tensor:
    """The nearest point of ``weight``'s own per-row grid (same dtype and shape)."""
    levels, scales = quantize_to_levels(weight, bits)
    return (levels.to(scales.dtype) * scales).to(weight.dtype)
