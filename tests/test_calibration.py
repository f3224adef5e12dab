"""Activation calibration (fairseq_accel/compression/calibration.py): entropy (KL) calibration against a
hand-computed case and a plain-loop implementation of the textbook algorithm, the MSE threshold against a
brute-force search on the samples themselves, mergeable histograms, and one-line errors."""
import math
from typing import Dict, List

import numpy as np
import pytest
import torch

from fairseq_accel.compression.calibration import (
    INT8_MAX,
    NUM_LEVELS,
    AbsHistogram,
    CalibrationError,
    int8_scale,
    kl_divergence,
    kl_end_bin,
    kl_threshold,
    max_threshold,
    mse_threshold,
)


def samples() -> Dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    gaussian = torch.randn(100_000, generator=generator)
    with torch.random.fork_rng():  # Laplace draws from the global generator: seed it, or the tests depend on order
        torch.manual_seed(0)
        laplace = torch.distributions.Laplace(0.0, 1.0).sample((100_000,))
    return {"gaussian": gaussian, "laplace": laplace,
            "gaussian_with_outliers": torch.cat([gaussian, torch.full((20,), 40.0)])}


def histogram_of(name: str, values: torch.Tensor, batches: int = 4) -> AbsHistogram:
    histogram = AbsHistogram(name)
    for batch in values.chunk(batches):
        histogram.add(batch)
    return histogram


def test_kl_on_a_hand_computed_case() -> None:
    """counts [4, 2, 1, 1] into 2 levels. Kept bins i = 2: P = [4, 2+1+1] -> [1/2, 1/2], Q = [4, 2] -> [2/3, 1/3],
    KL = ln(1.125)/2. i = 3: P = [4, 2, 1+1] -> [1/2, 1/4, 1/4], Q = [4 | 2, 1 -> 1.5, 1.5] -> [4/7, 1.5/7, 1.5/7],
    KL = ln(49/48)/2. i = 4: P = [4, 2, 1, 1]/8, Q = [4, 2 -> 3, 3 | 1, 1] /8, KL = ln(4/3)/2 + ln(2/3)/4.
    The smallest is i = 3."""
    assert kl_end_bin(np.array([4, 2, 1, 1]), levels=2) == 3
    assert kl_divergence(np.array([4.0, 4.0]), np.array([4.0, 2.0])) == pytest.approx(math.log(1.125) / 2)
    assert kl_divergence(np.array([4.0, 2.0, 2.0]), np.array([4.0, 1.5, 1.5])) == pytest.approx(math.log(49 / 48) / 2)
    assert kl_divergence(np.array([4.0, 2.0, 1.0, 1.0]), np.array([3.0, 3.0, 1.0, 1.0])) == pytest.approx(
        math.log(4 / 3) / 2 + math.log(2 / 3) / 4)
    assert kl_end_bin(np.array([5, 0, 3]), levels=4) == 3  # fits in the levels: nothing clipped


def textbook_end_bin(counts: np.ndarray, levels: int = NUM_LEVELS) -> int:
    """Entropy calibration written as plain loops over bins (the slides' pseudo-code), as a reference."""
    used = max(index for index, count in enumerate(counts) if count > 0) + 1
    best, best_kl = used, float("inf")
    for bins in range(levels, used + 1):
        p = [float(c) for c in counts[:bins]]
        p[-1] += float(sum(counts[bins:]))
        q = [0.0] * bins
        for level in range(levels):
            start, stop = bins * level // levels, bins * (level + 1) // levels
            filled = [j for j in range(start, stop) if counts[j] > 0]
            for j in filled:
                q[j] = sum(float(counts[k]) for k in range(start, stop)) / len(filled)
        p_total, q_total = sum(p), sum(q)
        p = [value / p_total for value in p]
        q = [value / q_total for value in q]
        missing = [j for j in range(bins) if q[j] == 0]
        if any(p[j] > 0 for j in missing):  # smooth: 1e-4 of mass onto Q's empty bins
            held = bins - len(missing)
            q = [1e-4 / len(missing) if value == 0 else value - 1e-4 / held for value in q]
        kl = sum(p[j] * math.log(p[j] / q[j]) for j in range(bins) if p[j] > 0)
        if kl < best_kl:
            best, best_kl = bins, kl
    return best


@pytest.mark.parametrize("name", ["gaussian", "laplace", "gaussian_with_outliers"])
def test_kl_matches_the_textbook_loops(name: str) -> None:
    histogram = histogram_of(name, samples()[name])
    assert kl_end_bin(histogram.counts) == textbook_end_bin(list(histogram.counts))


def sample_mse(values: torch.Tensor, threshold: float) -> float:
    scale = threshold / INT8_MAX
    return float(((torch.clamp(torch.round(values / scale), -INT8_MAX, INT8_MAX) * scale - values) ** 2).mean())


@pytest.mark.parametrize("name", ["gaussian", "laplace", "gaussian_with_outliers"])
def test_mse_threshold_matches_a_brute_force_search_on_the_samples(name: str) -> None:
    values = samples()[name]
    histogram = histogram_of(name, values)
    candidates: List[float] = np.linspace(0.5, float(values.abs().max()), 300).tolist()
    best = min(candidates, key=lambda threshold: sample_mse(values, threshold))
    chosen = mse_threshold(histogram)
    assert sample_mse(values, chosen) <= 1.01 * sample_mse(values, best)
    assert abs(chosen - best) <= 0.02 * float(values.abs().max())


def test_kl_clips_outliers_and_keeps_the_bulk() -> None:
    data = samples()
    outliers = histogram_of("with_outliers", data["gaussian_with_outliers"])
    assert kl_threshold(outliers) < 0.15 * max_threshold(outliers)  # 20 values at 40 do not set the range
    gaussian = histogram_of("gaussian", data["gaussian"])
    assert 3.0 < kl_threshold(gaussian) <= max_threshold(gaussian)  # clips only the far tail of N(0, 1)
    assert int8_scale(gaussian, "kl") == pytest.approx(kl_threshold(gaussian) / INT8_MAX)


def test_histograms_merge_exactly() -> None:
    """Two processes calibrating halves of the data (different ranges) and merging give the histogram of one
    process that saw everything, and so the same thresholds; the merge survives a state_dict round trip."""
    values = samples()["gaussian_with_outliers"]
    whole = histogram_of("layer", values, batches=8)
    small, large = AbsHistogram("layer"), AbsHistogram("layer")
    small.add(values[:50_000])  # |x| < 8: range 8
    large.add(values[50_000:])  # holds the outliers at 40: range 64
    restored = AbsHistogram.from_state_dict(small.state_dict())
    restored.merge(large)
    assert small.limit == 8.0 and large.limit == 64.0
    assert restored.limit == whole.limit and np.array_equal(restored.counts, whole.counts)
    assert kl_threshold(restored) == kl_threshold(whole)


def test_bad_activations_are_one_line() -> None:
    histogram = AbsHistogram("encoder.layers.2.fc1")
    with pytest.raises(CalibrationError, match=r"^encoder\.layers\.2\.fc1: 2 NaN or infinite activation values"):
        histogram.add(torch.tensor([1.0, float("nan"), float("inf")]))
    with pytest.raises(CalibrationError, match=r"^encoder\.layers\.2\.fc1: no calibration values reached"):
        int8_scale(histogram)
