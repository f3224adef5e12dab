"""Int8 execution of a model loaded from a compressed checkpoint: every linear layer whose weight the
checkpoint stores as integer levels, whose input it has a calibrated scale for, and that is large enough for
an int8 GEMM to pay, becomes an :class:`~fairseq_accel.modules.int8_linear.Int8Linear` on exactly those
levels (nothing is re-quantized). Smaller layers run float32 on the same stored levels.

The size floor depends on the int8 GEMM. The plugin's own (the C++ extension, csrc/int8_gemm_cpu.cpp) beats
float32 ``addmm`` at every layer size measured, from 160x160 up, at a decoding step's 5 rows as at 160 (2.3x and
1.7x there; 1 thread, AVX-512 VNNI Xeon, 2026-12-01): no floor. fbgemm's, the fallback where the extension is
not built, costs ~30-40 us per call whatever its size (it quantizes and packs the activations, and computes row
offsets, on every call), while float32 of a 128x128 or 256x256 layer on a step's few rows takes 5-40 us:
measured with ``fairseq-accel-benchmark`` on the mini LSRA (2026-11-30, AVX2 without VNNI;
docs/results/2026-11-30_int8_execution), int8 over float32 at 5 / 160 rows, 1 thread: 128x128 0.16 / 0.53,
256x256 0.38 / 0.98, 256x8000 6.2 / 1.8; earlier microbenchmark: 256x1024 1.7 / 1.6, 1024x256 2.1 / 1.8. So
with fbgemm, layers of 256x1024 (262,144 weights) and more run in int8.

Both generators then run it: fairseq's ``SequenceGenerator`` through the modules, and the fast generator,
whose steps call :func:`linear_step` / :func:`fused_linear_step` and so pick the int8 layers up too.
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, List, Optional, Sequence

import torch
from fairseq.modules import MultiheadAttention
from torch import Tensor, nn

from fairseq_accel.compression.compressed_format import check_version, packed_tensors
from fairseq_accel.inference.cpu_kernels import cpu_kernels_available
from fairseq_accel.modules.int8_linear import OUTPUT_LEVEL, Int8Linear

logger = logging.getLogger(__name__)
LinearStep = Callable[[Tensor], Tensor]
FBGEMM_MIN_WEIGHTS = 256 * 1024  # smallest layer that pays as an fbgemm int8 GEMM (module docstring)
# smallest layer that runs as an int8 GEMM by default: every one with the plugin's own int8 GEMM
INT8_MIN_WEIGHTS = 0 if cpu_kernels_available() else FBGEMM_MIN_WEIGHTS


def _canonical(name: str, aliases: Dict[str, str]) -> str:
    return aliases.get(name, name)


def convert_to_int8(model: nn.Module, section: Dict, source: str, min_weights: int = INT8_MIN_WEIGHTS) -> List[str]:
    """Replace the model's linear layers of at least ``min_weights`` weights by int8 ones where the
    compressed ``section`` allows it (levels and an activation scale stored); returns the names replaced. A
    layer shared by several parents (layer sharing) becomes one shared int8 layer."""
    check_version(section, source)
    aliases = section["aliases"]
    packed = packed_tensors(section)
    activations = section.get("activations", {})
    input_scales, zero_points = activations.get("scales", {}), activations.get("zero_points", {})
    output_ranges = activations.get("output_absmax", {})  # absent in checkpoints of earlier plugin versions
    replaced: Dict[int, Int8Linear] = {}
    names = []
    parents = list(model.named_modules(remove_duplicate=False))
    for parent_name, parent in parents:
        for child_name, child in list(parent._modules.items()):
            if not isinstance(child, nn.Linear) or child.weight.numel() < min_weights:
                continue
            full_name = f"{parent_name}.{child_name}" if parent_name else child_name
            key = _canonical(f"{full_name}.weight", aliases)
            if key not in packed or key not in input_scales:
                continue
            if id(child) not in replaced:
                int8 = Int8Linear(packed[key].levels(), packed[key].scales, child.bias, input_scales[key],
                                  zero_points[key], output_ranges.get(key))
                replaced[id(child)] = int8.to(child.weight.device)
            setattr(parent, child_name, replaced[id(child)])
            names.append(full_name)
    call_projection_modules(model)
    return names


def call_projection_modules(model: nn.Module) -> None:
    """Make fairseq's attention call its projection modules: without incremental state it passes their
    weights to ``F.multi_head_attention_forward`` instead, which would bypass int8 layers and calibration
    hooks. The module path computes the same attention (fairseq's own fallback for other cases)."""
    for module in model.modules():
        if isinstance(module, MultiheadAttention):
            module._set_skip_embed_dim_check()


def output_level_steps(layer: nn.Module, heads: int, head_dim: int) -> Optional[Tensor]:
    """``[parts, heads, head_dim]``: the value of one int8 output level of each channel of an attention
    projection (``output_absmax / 127``; ``parts`` = 3 for a fused query/key/value layer), or None unless
    it is an int8 layer with calibrated output ranges (the int8 attention path needs them)."""
    if not isinstance(layer, Int8Linear) or layer.output_absmax is None:
        return None
    return (layer.output_absmax / OUTPUT_LEVEL).view(-1, heads, head_dim)


def log_int8_attention(layers: int) -> None:
    """The one line a fast decoder logs when ``layers`` of its attention layers take the int8 attention path."""
    if layers:
        logger.info(f"int8 attention path: {layers} attention layers write int8 keys/values straight from their "
                    "int8 projections into the caches")


class TransposedLinear:
    """``x @ W^T + b`` for ``x`` of ``[rows, in]``, from ``W^T`` stored contiguous once: ``addmm`` on it is
    1.2-1.6x ``F.linear`` (which hands MKL the transposed view) at a decoding step's 5 rows, 1.05-1.2x at 160
    (256-1024 wide layers, 1 thread; docs/results/2026-11-30_decoding_step/gemm_layout.txt), equal to float
    rounding (MKL sums in another order at few rows). The C++ decoder step takes ``weight_t`` and ``bias``."""

    def __init__(self, weight: Tensor, bias: Optional[Tensor]):
        self.weight_t = weight.detach().t().contiguous()
        self.bias = None if bias is None else bias.detach()

    def __call__(self, x: Tensor) -> Tensor:
        return torch.mm(x, self.weight_t) if self.bias is None else torch.addmm(self.bias, x, self.weight_t)


def linear_step(layer: nn.Module) -> LinearStep:
    """A linear layer as a step function on ``[rows, in]`` inputs: the int8 layer itself, or
    :class:`TransposedLinear` on its weight (no module call)."""
    if isinstance(layer, Int8Linear):
        return layer
    return TransposedLinear(layer.weight, layer.bias)


def fused_linear_step(layers: Sequence[nn.Module], row_factors: Sequence[Tensor]) -> LinearStep:
    """``cat([layer(x) * factor[:, None]])`` over layers of the same input, as one GEMM (the factors are
    folded into the weights, e.g. attention's query scaling): int8 when every layer is int8, otherwise
    float32 on their weights (dequantized where int8)."""
    biases = [layer.bias for layer in layers]
    if any(b is None for b in biases) and any(b is not None for b in biases):
        raise ValueError("fused layers must all have biases or none")
    if all(isinstance(layer, Int8Linear) for layer in layers):
        return Int8Linear.fuse(layers, row_factors)
    weight = torch.cat([layer.weight * f[:, None] for layer, f in zip(layers, row_factors)])
    bias = None if biases[0] is None else torch.cat([b * f for b, f in zip(biases, row_factors)])
    return TransposedLinear(weight, bias)
