"""Similarity-aware calibration (fairseq_accel/compression/similarity_calibration.py, arXiv 2106.14156): the
row sample does not depend on batch order or sharding, and the chosen range is the candidate whose quantized
input keeps the layer's outputs most correlated with the float ones, which is the whole range where the
largest inputs matter and a clipped one where they meet zero weights."""
import pytest
import torch

from fairseq_accel.compression.activation_calibration import SIMILARITY, LinearInputCalibrator
from fairseq_accel.compression.calibration import CalibrationError
from fairseq_accel.compression.similarity_calibration import (
    CANDIDATES,
    SMALLEST_FRACTION,
    RowSample,
    pearson,
    similarity_threshold,
)
from fairseq_accel.modules.int8_linear import SIGNED_ZERO_POINT, activation_max_level

MAX_LEVEL = activation_max_level(SIGNED_ZERO_POINT)


def batches(count: int = 4, rows: int = 50, columns: int = 16) -> list:
    generator = torch.Generator().manual_seed(3)
    return [torch.randn(rows, columns, generator=generator) for _ in range(count)]


def test_sample_is_the_same_in_any_order_and_split() -> None:
    inputs = batches()
    forward, backward, part_a, part_b = (RowSample("layer", capacity=64) for _ in range(4))
    for x in inputs:
        forward.add(x)
    for x in reversed(inputs):
        backward.add(x)
    for x in inputs[:3]:
        part_a.add(x)
    part_b.add(inputs[3])
    part_a.merge(part_b)
    assert forward.rows.shape == (64, 16)
    assert torch.equal(forward.rows, backward.rows) and torch.equal(forward.rows, part_a.rows)
    every_row = {tuple(row.tolist()) for x in inputs for row in x}
    assert all(tuple(row.tolist()) in every_row for row in forward.rows)  # rows as they came, none made up


def outlier_inputs(outlier_weight: float) -> "tuple[RowSample, torch.Tensor]":
    """Inputs of 8 channels, N(0, 1) but channel 0 up to 40 on a few rows; the layer's weights on channel 0 are
    ``outlier_weight`` times the others'."""
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(400, 8, generator=generator)
    x[::50, 0] = 40.0
    weight = torch.randn(6, 8, generator=generator)
    weight[:, 0] *= outlier_weight
    sample = RowSample("layer", capacity=400)
    sample.add(x)
    return sample, weight


def brute_force(sample: RowSample, weight: torch.Tensor) -> float:
    largest = float(sample.rows.abs().max())
    scores = {}
    for fraction in torch.linspace(SMALLEST_FRACTION, 1.0, CANDIDATES).tolist():
        scale = largest * fraction / MAX_LEVEL  # the signed 7-bit grid, levels -64..63, written out here
        quantized = torch.clamp(torch.round(sample.rows / scale), -64, 63) * scale
        scores[largest * fraction] = pearson(sample.rows @ weight.t(), quantized @ weight.t())
    return max(scores, key=scores.get)


def test_range_follows_the_weights_of_the_outlier_channel() -> None:
    ignored_sample, ignored_weight = outlier_inputs(outlier_weight=0.0)  # the outliers meet zero weights
    clipped = similarity_threshold(ignored_sample, [(ignored_weight, None)], SIGNED_ZERO_POINT)
    assert clipped < 10  # the N(0, 1) channels get the levels; clipping channel 0 costs nothing
    used_sample, used_weight = outlier_inputs(outlier_weight=1.0)
    kept = similarity_threshold(used_sample, [(used_weight, None)], SIGNED_ZERO_POINT)
    assert kept > 20  # clipping channel 0 would bend every output of those rows
    for sample, weight, chosen in ((ignored_sample, ignored_weight, clipped), (used_sample, used_weight, kept)):
        assert chosen == brute_force(sample, weight)


def test_calibrator_scales_by_similarity_and_refuses_without_samples() -> None:
    sample, weight = outlier_inputs(outlier_weight=0.0)
    calibrator = LinearInputCalibrator(["layer"], sample_rows=400)
    calibrator._record("layer", sample.rows)
    calibrator.batches = 1
    scale, zero_point = calibrator.quantizers(SIMILARITY, ["layer"], {"layer": (weight, None)})["layer"]
    assert zero_point == SIGNED_ZERO_POINT
    assert scale * MAX_LEVEL == similarity_threshold(sample, [(weight, None)], SIGNED_ZERO_POINT)
    assert calibrator.quantizers("max", ["layer"])["layer"][0] > 3 * scale  # max keeps the outliers' range
    unsampled = LinearInputCalibrator(["layer"])
    unsampled._record("layer", sample.rows)
    unsampled.batches = 1
    with pytest.raises(CalibrationError, match="no input rows were sampled for --act-calib pearson"):
        unsampled.quantizers(SIMILARITY, ["layer"], {"layer": (weight, None)})


def test_layers_reading_one_input_share_one_range() -> None:
    """A self-attention's query, key and value projections read the same input and run as one fused int8 GEMM:
    they get one range (found on the first real run: three ranges made the fused layer refuse them)."""
    sample, weight = outlier_inputs(outlier_weight=0.0)
    other = torch.randn(6, 8, generator=torch.Generator().manual_seed(6))  # uses the outlier channel
    calibrator = LinearInputCalibrator(["q", "k", "alone"], sample_rows=400)
    for name in ("q", "k"):
        calibrator._record(name, sample.rows)
    calibrator._record("alone", sample.rows[:200])
    calibrator.batches = 1
    weights = {"q": (weight, None), "k": (other, None), "alone": (weight, None)}
    scales = {name: scale for name, (scale, _) in calibrator.quantizers(SIMILARITY, ["q", "k", "alone"], weights).items()}
    assert scales["q"] == scales["k"]
    joint = similarity_threshold(sample, [(weight, None), (other, None)], SIGNED_ZERO_POINT)
    assert scales["q"] * MAX_LEVEL == joint
    assert scales["alone"] != scales["q"]  # other rows, its own range
