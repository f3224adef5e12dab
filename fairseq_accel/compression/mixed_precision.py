"""Mixed precision by sensitivity: which linear layers may run in int8 (weights and activations) while the
model's dev loss rises by at most a given amount; the others keep float32 weights and inputs.

Each layer's sensitivity is the rise of the teacher-forced dev loss (nats per target token) when it alone is
int8. The layers are then taken least sensitive first; the largest such prefix whose joint loss rise stays
within the budget (found by bisection: the rise grows with the prefix) runs in int8. This is the tuning
loop of Intel Neural Compressor's accuracy-driven quantization, with one layer as the unit and the loss as
the criterion.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from fairseq_accel.compression.activation_calibration import teacher_forced_forward
from fairseq_accel.compression.calibration import CalibrationError
from fairseq_accel.inference.int8_execution import call_projection_modules
from fairseq_accel.modules.int8_linear import Int8Linear

Quantizer = Tuple[int, float, int]  # weight bits, input scale, input zero point


@dataclass
class LayerSensitivity:
    name: str
    params: int
    loss_rise: float  # dev loss with this layer alone in int8, minus the float model's
    int8: bool = False  # chosen precision: int8, or float32


def teacher_forced_loss(model: nn.Module, batches: Sequence[Dict], pad: int) -> float:
    """Mean negative log-likelihood per target token of ``batches`` (fairseq samples)."""
    total, tokens = 0.0, 0
    with torch.no_grad():
        for sample in batches:
            log_probs = model.get_normalized_probs(teacher_forced_forward(model, sample["net_input"]), log_probs=True)
            target = sample["target"]
            keep = target.ne(pad)
            total -= float(log_probs.gather(-1, target.unsqueeze(-1)).squeeze(-1)[keep].sum())
            tokens += int(keep.sum())
    if tokens == 0:
        raise CalibrationError("the sensitivity set has no target tokens (check --sensitivity-subset)")
    return total / tokens


def _parent(model: nn.Module, name: str) -> Tuple[nn.Module, str]:
    path, _, child = name.rpartition(".")
    return (model.get_submodule(path) if path else model), child


@contextmanager
def int8_layers(model: nn.Module, names: Sequence[str], quantizers: Dict[str, Quantizer]) -> Iterator[None]:
    """The model with the linear layers ``names`` as int8 layers (their weights on their per-row grid of
    ``quantizers[name]``'s bits, their inputs quantized with its scale and zero point), restored on exit."""
    originals = {}
    for name in names:
        parent, child = _parent(model, name)
        layer = getattr(parent, child)
        originals[name] = layer
        setattr(parent, child, Int8Linear.from_linear(layer, *quantizers[name]))
    try:
        yield
    finally:
        for name, layer in originals.items():
            parent, child = _parent(model, name)
            setattr(parent, child, layer)


def plan_mixed_precision(model: nn.Module, quantizers: Dict[str, Quantizer], batches: Sequence[Dict],
                         pad: int, max_loss_rise: float,
                         progress: Optional[Callable[[int], None]] = None) -> Tuple[float, List[LayerSensitivity]]:
    """The float model's dev loss, and every layer of ``quantizers`` with its sensitivity and chosen
    precision (most sensitive first), such that all int8 layers together raise the loss by at most
    ``max_loss_rise``. The loss is the decoder's: a CTC head shows no rise (measuring by WER through the
    generator is the next step)."""
    if max_loss_rise < 0:
        raise CalibrationError(f"--max-accuracy-drop must be >= 0, got {max_loss_rise}")
    model.eval()
    call_projection_modules(model)
    base = teacher_forced_loss(model, batches, pad)
    rows = []
    for name in quantizers:
        with int8_layers(model, [name], quantizers):
            rise = teacher_forced_loss(model, batches, pad) - base
        rows.append(LayerSensitivity(name, model.get_submodule(name).weight.numel(), rise))
        if progress is not None:
            progress(1)
    rows.sort(key=lambda row: row.loss_rise)

    def fits(count: int) -> bool:
        with int8_layers(model, [row.name for row in rows[:count]], quantizers):
            return teacher_forced_loss(model, batches, pad) - base <= max_loss_rise

    low, high = 0, len(rows)  # fits(low) holds (no int8 layer); find the largest count that fits
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    for row in rows[:low]:
        row.int8 = True
    return base, rows[::-1]


def format_sensitivity_table(base: float, rows: Sequence[LayerSensitivity]) -> str:
    lines = [f"float model dev loss {base:.4f}; int8 layers: {sum(r.int8 for r in rows)} of {len(rows)}",
             "| layer | params | loss rise alone in int8 | precision |", "|---|---|---|---|"]
    lines += [f"| {r.name} | {r.params:,} | {r.loss_rise:+.4f} | {'int8' if r.int8 else 'float32'} |" for r in rows]
    return "\n".join(lines)
