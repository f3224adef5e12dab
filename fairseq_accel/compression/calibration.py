"""Activation calibration for symmetric int8: a mergeable histogram of |x| per tensor, and the clipping
threshold chosen from it by KL divergence (TensorRT's entropy calibration), a percentile, least squared
error, or the maximum.

Entropy calibration (Migacz, "8-bit Inference with TensorRT", GTC 2017; ``../shared/design.md`` §5): the
histogram has 2048 bins of |x|; for every candidate end bin i >= 128, P is the first i bins with the counts
beyond them folded into bin i-1, Q is the same i bins merged into 128 levels and spread back over the bins
that were non-empty, and the threshold is the upper edge of the i that minimises KL(P || Q). The int8 scale
is threshold / 127.

The histogram grows by doubling its range (pairs of bins merge), so two histograms of the same tensor taken
on different batches, processes or machines can always be brought to one range and added: calibration can
be split and merged without changing the result.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict

import numpy as np
import torch

NUM_BINS = 2048  # TensorRT's histogram size
NUM_LEVELS = 128  # positive int8 levels of a symmetric quantizer (0..127), the "128" of entropy calibration
INT8_MAX = 127
KL_SMOOTHING = 1e-4  # probability mass moved onto bins that P holds and Q lacks, so that KL stays finite


class CalibrationError(ValueError):
    """One line naming the tensor (layer) and what makes its activations unusable for calibration."""


@dataclass
class AbsHistogram:
    """Counts of |x| in ``NUM_BINS`` equal bins over [0, ``limit``); ``limit`` doubles when a value exceeds it."""

    name: str
    limit: float = 0.0
    counts: np.ndarray = field(default_factory=lambda: np.zeros(NUM_BINS, dtype=np.int64))

    @property
    def bin_width(self) -> float:
        return self.limit / NUM_BINS

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def _grow_to(self, value: float) -> None:
        """Double the range (merging pairs of bins) until ``value`` lies inside it."""
        if self.limit == 0.0:
            # the first range: the smallest power of two above the first maximum, so ranges of the same
            # tensor seen by different processes are powers of two apart and merge exactly
            self.limit = float(2.0 ** np.ceil(np.log2(value))) if value > 0 else 1.0
            if self.limit <= value:
                self.limit *= 2
            return
        while self.limit <= value:
            self.counts = self.counts.reshape(-1, 2).sum(axis=1)
            self.counts = np.concatenate([self.counts, np.zeros(NUM_BINS // 2, dtype=np.int64)])
            self.limit *= 2

    def add(self, values: torch.Tensor) -> None:
        """Count |values|; NaN or infinite values raise :class:`CalibrationError` naming this tensor."""
        magnitudes = values.detach().float().abs().flatten()
        if magnitudes.numel() == 0:
            return
        if not bool(torch.isfinite(magnitudes).all()):
            bad = int((~torch.isfinite(magnitudes)).sum())
            raise CalibrationError(f"{self.name}: {bad} NaN or infinite activation values in a calibration batch; "
                                   "check the model and the input features")
        self._grow_to(float(magnitudes.max()))
        index = torch.clamp((magnitudes / self.bin_width).long(), max=NUM_BINS - 1)
        self.counts += torch.bincount(index, minlength=NUM_BINS).numpy()

    def merge(self, other: "AbsHistogram") -> None:
        """Add ``other`` (the same tensor, calibrated elsewhere) into this histogram."""
        if other.total == 0:
            return
        if self.total == 0:
            self.limit, self.counts = other.limit, other.counts.copy()
            return
        wider, narrower = (self, other) if self.limit >= other.limit else (other, self)
        rescaled = AbsHistogram(self.name, narrower.limit, narrower.counts.copy())
        rescaled._grow_to(wider.limit * (1 - 1e-12))
        if rescaled.limit != wider.limit:
            raise CalibrationError(f"{self.name}: histogram ranges {self.limit} and {other.limit} are not a power "
                                   "of two apart; they were not made by AbsHistogram")
        self.limit, self.counts = wider.limit, wider.counts + rescaled.counts

    def state_dict(self) -> Dict[str, object]:
        return {"name": self.name, "limit": self.limit, "counts": torch.from_numpy(self.counts.copy())}

    @classmethod
    def from_state_dict(cls, state: Dict[str, object]) -> "AbsHistogram":
        return cls(str(state["name"]), float(state["limit"]), np.asarray(state["counts"], dtype=np.int64))


def _merge_into_levels(counts: np.ndarray, levels: int) -> np.ndarray:
    """Spread-back Q of ``counts`` (at least ``levels`` bins): ``levels`` groups of consecutive bins (sizes
    differ by at most one), each group's total divided evenly over its non-empty bins; empty bins stay empty."""
    edges = np.arange(levels + 1) * len(counts) // levels
    filled = counts > 0
    totals = np.add.reduceat(counts, edges[:-1])
    filled_bins = np.add.reduceat(filled.astype(np.float64), edges[:-1])
    per_bin = np.divide(totals, filled_bins, out=np.zeros_like(totals, dtype=np.float64), where=filled_bins > 0)
    return np.repeat(per_bin, np.diff(edges)) * filled


def _smooth(distribution: np.ndarray, eps: float = KL_SMOOTHING) -> np.ndarray:
    """Move ``eps`` of probability onto the empty bins (taken evenly from the others)."""
    empty = distribution == 0
    if not empty.any() or empty.all():
        return distribution
    smoothed = distribution.copy()
    smoothed[empty] = eps / empty.sum()
    smoothed[~empty] -= eps / (~empty).sum()
    return smoothed


def kl_divergence(p_counts: np.ndarray, q_counts: np.ndarray) -> float:
    """KL(P || Q) of two count vectors, normalised; Q smoothed where it lacks mass P has."""
    p = p_counts / p_counts.sum()
    q = q_counts / q_counts.sum()
    q = _smooth(q) if ((q == 0) & (p > 0)).any() else q
    held = p > 0
    return float(np.sum(p[held] * np.log(p[held] / q[held])))


def _used_bins(counts: np.ndarray) -> int:
    """Bins up to and including the last non-empty one (1 for an empty histogram)."""
    return int(np.nonzero(counts)[0].max()) + 1 if counts.any() else 1


def kl_end_bin(counts: np.ndarray, levels: int = NUM_LEVELS) -> int:
    """Entropy calibration on a histogram ``counts``: the number of bins i (>= ``levels``) kept below the
    threshold that minimises KL(P || Q) (module docstring); all used bins when they fit in ``levels``."""
    counts = np.asarray(counts, dtype=np.float64)
    used = _used_bins(counts)
    if used <= levels:  # every value fits in the int8 levels without merging bins: nothing to clip
        return used
    best_bins, best_divergence = used, float("inf")
    for bins in range(levels, used + 1):
        reference = counts[:bins].copy()
        reference[bins - 1] += counts[bins:].sum()
        divergence = kl_divergence(reference, _merge_into_levels(counts[:bins], levels))
        if divergence < best_divergence:
            best_bins, best_divergence = bins, divergence
    return best_bins


def kl_threshold(histogram: AbsHistogram, max_level: int = INT8_MAX) -> float:
    """The clipping threshold of entropy calibration for levels 0..``max_level``: the upper edge of
    :func:`kl_end_bin`'s last bin."""
    return kl_end_bin(histogram.counts, levels=max_level + 1) * histogram.bin_width


def percentile_threshold(histogram: AbsHistogram, max_level: int = INT8_MAX, percentile: float = 99.99) -> float:
    """The upper edge of the bin where the cumulative count reaches ``percentile`` % of |x| (any ``max_level``)."""
    cumulative = np.cumsum(histogram.counts)
    index = int(np.searchsorted(cumulative, cumulative[-1] * percentile / 100.0))
    return (index + 1) * histogram.bin_width


def mse_threshold(histogram: AbsHistogram, max_level: int = INT8_MAX) -> float:
    """The threshold (a bin edge) that minimises the expected squared error of symmetric quantization to
    levels -``max_level``..``max_level`` (rounding inside the range, clipping outside it), with values taken
    at their bin centres."""
    centres = (np.arange(NUM_BINS) + 0.5) * histogram.bin_width
    counts = histogram.counts.astype(np.float64)
    used = _used_bins(counts)
    best_threshold, best_error = used * histogram.bin_width, float("inf")
    for bins in range(1, used + 1):
        threshold = bins * histogram.bin_width
        step = threshold / max_level
        quantized = np.minimum(np.round(centres / step), max_level) * step
        error = float(np.sum(counts * (centres - quantized) ** 2))
        if error < best_error:
            best_threshold, best_error = threshold, error
    return best_threshold


def max_threshold(histogram: AbsHistogram, max_level: int = INT8_MAX) -> float:
    """The upper edge of the last non-empty bin (no clipping, any ``max_level``)."""
    return _used_bins(histogram.counts) * histogram.bin_width


THRESHOLDS: Dict[str, Callable[[AbsHistogram, int], float]] = {
    "kl": kl_threshold, "percentile": percentile_threshold, "mse": mse_threshold, "max": max_threshold,
}


def int8_scale(histogram: AbsHistogram, method: str = "kl", max_level: int = INT8_MAX) -> float:
    """Scale of symmetric activations (x ≈ scale · q, q in [-max_level, max_level]; int8: 127) by ``method``
    (:data:`THRESHOLDS`)."""
    if histogram.total == 0:
        raise CalibrationError(f"{histogram.name}: no calibration values reached this tensor; the calibration set "
                               "is empty or never runs this layer")
    return THRESHOLDS[method](histogram, max_level) / max_level
