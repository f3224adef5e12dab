"""Mixed precision by sensitivity: which linear layers may run in int8 (weights and activations), and
optionally which of those may store int4 weights, while the model's dev cost (the teacher-forced loss, or
-BLEU, WER or CER through the generator: sensitivity_measures.py) rises by at most a given amount; the others
keep float32 weights and inputs.

Each layer's sensitivity is the rise of the cost when it alone is int8. The layers are then taken least
sensitive first; the largest such prefix whose joint rise stays within the budget (found by bisection: the
rise grows with the prefix) runs in int8. With int4 allowed, each layer is also measured alone with 4-bit
weights, and the largest prefix of the int8 layers, least sensitive to int4 first, whose int4 weights keep the
joint rise (with all the int8 layers) within the same budget gets them. This is the tuning loop of Intel Neural
Compressor's accuracy-driven quantization, with one layer as the unit.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from torch import nn

from fairseq_accel.compression.calibration import CalibrationError
from fairseq_accel.compression.sensitivity_measures import SensitivityMeasure
from fairseq_accel.inference.int8_execution import call_projection_modules
from fairseq_accel.modules.int8_linear import Int8Linear

Quantizer = Tuple[int, float, int]  # weight bits, input scale, input zero point


@dataclass
class LayerSensitivity:
    name: str
    params: int
    rise: float  # dev cost with this layer alone in int8, minus the float model's
    int4_rise: Optional[float] = None  # the same with its weights on the 4-bit grid (measured when int4 is allowed)
    precision: str = "float32"  # chosen: int4 (4-bit weights, int8 inputs), int8 or float32


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


def _largest_fitting_prefix(length: int, fits: Callable[[int], bool]) -> int:
    """The largest ``count <= length`` with ``fits(count)``, given that ``fits(0)`` holds and that a prefix
    that does not fit has no longer prefix that fits (bisection)."""
    low, high = 0, length
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return low


def plan_mixed_precision(model: nn.Module, quantizers: Dict[str, Quantizer], measure: SensitivityMeasure,
                         max_rise: float, progress: Optional[Callable[[int], None]] = None,
                         allow_int4: bool = False) -> Tuple[float, List[LayerSensitivity]]:
    """The float model's dev cost (``measure``, of ``model``), and every layer of ``quantizers`` with its
    sensitivity and chosen precision (most sensitive first), such that all int8 (and, with ``allow_int4``, int4)
    layers together raise the cost by at most ``max_rise``."""
    if max_rise < 0:
        raise CalibrationError(f"--max-accuracy-drop must be >= 0, got {max_rise}")
    model.eval()
    call_projection_modules(model)
    base = measure.cost()
    int4_grid = {name: (4, *quantizer[1:]) for name, quantizer in quantizers.items()}

    def rise(int8: Sequence[str], int4: Sequence[str] = ()) -> float:
        """The cost rise with the layers ``int8`` on their grid of ``quantizers`` and ``int4`` on the 4-bit one."""
        with int8_layers(model, [*int8, *int4], {**quantizers, **{name: int4_grid[name] for name in int4}}):
            return measure.cost() - base

    rows = []
    for name in quantizers:  # each layer alone: int8, and with int4 allowed also 4-bit weights (2 steps of progress)
        row = LayerSensitivity(name, model.get_submodule(name).weight.numel(), rise([name]))
        if allow_int4:
            row.int4_rise = rise([], [name])
        rows.append(row)
        if progress is not None:
            progress(2 if allow_int4 else 1)
    rows.sort(key=lambda row: row.rise)
    int8 = rows[:_largest_fitting_prefix(len(rows), lambda count: rise([r.name for r in rows[:count]]) <= max_rise)]
    for row in int8:
        row.precision = "int8"
    if allow_int4:
        int8.sort(key=lambda row: row.int4_rise)
        names = [row.name for row in int8]
        count = _largest_fitting_prefix(len(int8), lambda k: rise(names[k:], names[:k]) <= max_rise)
        for row in int8[:count]:
            row.precision = "int4"
    rows.sort(key=lambda row: row.rise, reverse=True)
    return base, rows


def format_sensitivity_table(measure: SensitivityMeasure, base: float, rows: Sequence[LayerSensitivity]) -> str:
    counts = {precision: sum(r.precision == precision for r in rows) for precision in ("int4", "int8", "float32")}
    lines = [f"float model dev {measure.metric} {measure.shown(base):.4f}; int4 layers: {counts['int4']}, int8 layers: "
             f"{counts['int8']}, float32 layers: {counts['float32']} (of {len(rows)})",
             f"| layer | params | {measure.metric} damage alone in int8 ({measure.unit}) | alone with int4 weights | "
             "precision |", "|---|---|---|---|---|"]
    lines += [f"| {r.name} | {r.params:,} | {r.rise:+.4f} | "
              f"{'-' if r.int4_rise is None else f'{r.int4_rise:+.4f}'} | {r.precision} |" for r in rows]
    return "\n".join(lines)
