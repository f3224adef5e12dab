"""Which weights a sparsity pattern may remove together, and how many to remove for a given sparsity.

Every pattern turns a weight matrix's importance into *prunable units*, each with an importance and a size
(weights removed with it): single weights (``unstructured``), whole output rows (``row``: the structure
that makes a dense fp32 CPU matmul smaller), or, for ``N:M``, the ``M - N`` least important weights of
every group of ``M`` consecutive inputs (the rest of a group is never a candidate, so at sparsity
``1 - N/M`` every group keeps exactly ``N``: the layout of sparse tensor cores and int8 sparse kernels).
:func:`prune_least_important` removes the least important units until the requested number of weights is
reached, the same way for one matrix (per-layer threshold) or for the concatenated units of many (global
threshold). Ties break by position (stable sort), so every process computes the same masks from the same
importance.
"""
import re
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

from fairseq_accel.compression.errors import CompressionOptionError

#: Importance given to already-removed weights, so pruning never brings one back.
REMOVED = float("-inf")


@dataclass(frozen=True)
class Units:
    """Prunable units of one weight matrix: ``importance[u]``, ``size[u]`` weights, and ``index[u]``: the
    flat position (unstructured, N:M) or the row (row pattern) in the matrix."""

    importance: Tensor
    size: Tensor
    index: Tensor


@dataclass(frozen=True)
class SparsityPattern:
    """``kind`` is ``unstructured``, ``row`` or ``n:m`` (then ``kept``/``group`` are N and M)."""

    kind: str
    kept: int = 0
    group: int = 0

    def __str__(self) -> str:
        return f"{self.kept}:{self.group}" if self.kind == "n:m" else self.kind

    def reachable(self) -> Optional[float]:
        """The only sparsity an N:M pattern reaches in the end (None: any)."""
        return 1.0 - self.kept / self.group if self.kind == "n:m" else None

    def check_target(self, target: float) -> None:
        reachable = self.reachable()
        if reachable is not None and abs(target - reachable) > 1e-6:
            raise CompressionOptionError(
                f"--sparsity-pattern {self} keeps {self.kept} of every {self.group} weights, a sparsity of "
                f"{reachable:g}; a target of {target:g} cannot be reached with it (use {reachable:g})"
            )

    def check_shape(self, name: str, shape: Tuple[int, ...]) -> None:
        if self.kind == "n:m" and shape[-1] % self.group:
            raise CompressionOptionError(
                f"--sparsity-pattern {self} groups {self.group} consecutive inputs, but {name} has "
                f"{shape[-1]} inputs (shape {tuple(shape)}), not a multiple of {self.group}; exclude it with "
                f"--sparsity-override '{re.escape(name)}=0'"
            )

    def units(self, importance: Tensor) -> Units:
        """The prunable units of a ``[out, in]`` importance matrix (removed weights at :data:`REMOVED`)."""
        if self.kind == "row":
            return Units(importance.mean(dim=1), torch.full((importance.shape[0],), importance.shape[1]),
                         torch.arange(importance.shape[0]))
        flat = importance.flatten()
        if self.kind == "unstructured":
            return Units(flat, torch.ones_like(flat, dtype=torch.long), torch.arange(flat.numel()))
        groups = importance.reshape(-1, self.group)
        order = torch.sort(groups, dim=1, stable=True).indices[:, : self.group - self.kept]
        index = (order + torch.arange(groups.shape[0]).unsqueeze(1) * self.group).flatten()
        return Units(flat[index], torch.ones_like(index), index)

    def mask(self, shape: torch.Size, units: Units, removed: Tensor) -> Tensor:
        """The keep-mask (bool, ``shape``) with the units flagged in ``removed`` taken out."""
        keep = torch.ones(shape, dtype=torch.bool)
        if self.kind == "row":
            keep[units.index[removed]] = False
        else:
            keep.view(-1)[units.index[removed]] = False
        return keep


def parse_pattern(text: str) -> SparsityPattern:
    """``unstructured``, ``row`` or ``N:M`` with 0 < N < M."""
    if text in ("unstructured", "row"):
        return SparsityPattern(text)
    match = re.fullmatch(r"(\d+):(\d+)", text)
    if match and 0 < int(match.group(1)) < int(match.group(2)):
        return SparsityPattern("n:m", int(match.group(1)), int(match.group(2)))
    raise CompressionOptionError(
        f"--sparsity-pattern must be unstructured, row or N:M with 0 < N < M (e.g. 2:4), got {text!r}"
    )


def prune_least_important(units: Units, weights_to_remove: float) -> Tensor:
    """Flags (bool per unit) of the least important units whose sizes add up closest to
    ``weights_to_remove``; already-removed units come first, so they stay removed."""
    order = torch.sort(units.importance, stable=True).indices
    removed_so_far = torch.cumsum(units.size[order].to(torch.float64), dim=0)
    target = torch.tensor([float(weights_to_remove)], dtype=torch.float64)
    count = int(torch.searchsorted(removed_so_far, target, right=True))  # units that fit within the target
    if count < len(order):
        short_by = weights_to_remove - (removed_so_far[count - 1].item() if count else 0.0)
        if removed_so_far[count].item() - weights_to_remove < short_by:
            count += 1  # one more unit lands nearer the target than stopping short
    count = max(count, int((units.importance[order] == REMOVED).sum()))
    flags = torch.zeros(len(order), dtype=torch.bool)
    flags[order[:count]] = True
    return flags
