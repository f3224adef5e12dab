"""Similarity-aware activation calibration (Liu et al., "Post-Training Quantization for Vision Transformer",
arXiv 2106.14156, §3.2): a linear layer's input range is the one whose quantized input gives outputs most
similar to the float outputs, the similarity being the Pearson correlation of the two output tensors. That
depends on the layer's weights (clipping a channel whose weights are small costs little), which a histogram
of the input cannot tell, so calibration keeps a bounded sample of each layer's input rows.

The sample keeps the rows with the smallest content keys, a fixed pseudo-random function of each row's values:
which rows are kept depends neither on the order the batches came in nor on how they were split across
processes, so the samples of calibration shards merge exactly into the sample of one run over all of them.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fairseq_accel.modules.int8_linear import activation_levels, activation_max_level

SAMPLE_ROWS = 512  # input rows kept per layer: enough for a stable correlation, cheap to search over
CANDIDATES = 64  # thresholds tried per layer, evenly spaced ...
SMALLEST_FRACTION = 0.05  # ... from this share of the largest |x| in the sample to all of it


def content_keys(rows: Tensor) -> Tensor:
    """A pseudo-random key in [0, 1) per row, the same for the same values on any machine and in any batch
    (the fractional part of a scaled sine of a fixed projection: a common hash of numbers)."""
    projection = torch.linspace(1.0, 2.0, rows.size(-1), dtype=torch.float64)
    return torch.frac(torch.sin(rows.double() @ projection).abs() * 43758.5453)


class RowSample:
    """At most ``capacity`` input rows of one layer: those with the smallest :func:`content_keys`."""

    def __init__(self, name: str, capacity: int = SAMPLE_ROWS):
        self.name = name
        self.capacity = capacity
        self.rows: Optional[Tensor] = None
        self.keys: Optional[Tensor] = None

    def add(self, x: Tensor) -> None:
        rows = x.detach().float().reshape(-1, x.size(-1))
        self._keep(rows, content_keys(rows))

    def merge(self, other: "RowSample") -> None:
        if other.rows is not None:
            self._keep(other.rows, other.keys)

    def _keep(self, rows: Tensor, keys: Tensor) -> None:
        if self.rows is not None:
            rows, keys = torch.cat([self.rows, rows]), torch.cat([self.keys, keys])
        kept = torch.argsort(keys)[: self.capacity]
        self.rows, self.keys = rows[kept], keys[kept]

    def state_dict(self) -> Dict[str, object]:
        return {"name": self.name, "capacity": self.capacity, "rows": self.rows, "keys": self.keys}

    @classmethod
    def from_state_dict(cls, state: Dict[str, object]) -> "RowSample":
        sample = cls(str(state["name"]), int(state["capacity"]))
        sample.rows, sample.keys = state["rows"], state["keys"]
        return sample


def pearson(a: Tensor, b: Tensor) -> float:
    """The Pearson correlation of all elements of ``a`` and ``b``."""
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()).clamp_min(torch.finfo(torch.float64).tiny))


def similarity_threshold(sample: RowSample, layers: Sequence[Tuple[Tensor, Optional[Tensor]]], zero_point: int,
                         penalty: Optional[Callable[[Callable[[Tensor], Tensor]], float]] = None) -> float:
    """The threshold (the input the top level stands for) among :data:`CANDIDATES` whose quantized inputs
    give the outputs ``x W^T + b`` most correlated with the float ones, on ``sample``, on average over
    ``layers`` (weight, bias) that read this input (one int8 GEMM may fuse them: they need one scale),
    less ``penalty`` of the candidate's quantizer where given (ranking-aware calibration)."""
    x = sample.rows
    layers = [(w.detach().float(), None if b is None else b.detach().float()) for w, b in layers]
    references = [F.linear(x, w, b) for w, b in layers]
    largest = float(x.abs().max())
    max_level = activation_max_level(zero_point)
    if largest == 0:
        return 1.0  # every sampled input is 0: any range quantizes it exactly
    best_threshold, best_similarity = largest, float("-inf")
    for fraction in torch.linspace(SMALLEST_FRACTION, 1.0, CANDIDATES).tolist():
        threshold = largest * fraction
        scale = threshold / max_level

        def quantize(inputs: Tensor) -> Tensor:
            return activation_levels(inputs, scale, zero_point) * scale

        quantized = quantize(x)
        similarity = sum(pearson(r, F.linear(quantized, w, b)) for r, (w, b) in zip(references, layers)) / len(layers)
        if penalty is not None:
            similarity -= penalty(quantize)
        if similarity > best_similarity:
            best_threshold, best_similarity = threshold, similarity
    return best_threshold
