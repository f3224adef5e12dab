"""A linear layer that runs as an int8 GEMM: per-output-row int8 weights (the levels a compressed checkpoint
stores), activations quantized with one calibrated scale, int32 accumulation, float32 output.

    y[o] = scale_w[o] * scale_x * sum_i q_w[o, i] * q_x[i] + bias[o],
    q_x = clamp(round(x * (1 / scale_x)), -z, 127 - z)

with z = 64 for inputs of both signs and z = 0 for inputs that calibration saw only >= 0 (after a ReLU:
symmetric levels would leave half of them unused; measured on the mini LSRA, that alone cost 0.13 nats of
valid loss, almost all of the int8 loss).

Backend on the CPU: the plugin's own int8 GEMM (``fairseq_accel/csrc/int8_gemm_cpu.cpp``: AVX-512 VNNI, AVX2 or
plain loops, all giving the same integers, and the float rescale of :meth:`_rescaled` exactly), built with the
C++ extension; without it fbgemm's ``quantized::linear_with_input_q_dq_qweight_dq_output_fp32`` (one call:
quantize, int8 GEMM, rescale; the same integers, its own float rounding). fbgemm quantizes and packs the
activations and their row offsets in separate passes, ~30-40 us per call whatever the layer: measured on an
AVX-512 VNNI Xeon (2026-11-30, 1 thread, us at 5 / 160 rows, fp32 ``addmm`` / fbgemm / own): 160x8000 314 /
148 / 38 and 3569 / 2112 / 1369; 160x640 9.2 / 50 / 4.2 and 253 / 173 / 99; 640x160 8.8 / 63 / 5.0 and
248 / 201 / 157. Earlier, on an AVX2 EPYC without VNNI (ratios of fbgemm to fp32 ``F.linear`` at 5 / 40 / 160
rows): 256x8000 6.8 / 3.0 / 1.9, 256x1024 1.7 / 1.8 / 1.6, 1024x256 2.1 / 1.7 / 1.8, 256x256 0.7 / 1.2 /
1.0; oneDNN's dynamic and ``qlinear_pointwise`` paths were slower than fbgemm at every shape there (0.3-2.6)
and faster only at >= 160 rows on AMX machines (``../shared/design.md`` §6).

On CUDA the layer runs ``torch._int_mm`` (cuBLASLt int8 GEMM with int32 accumulation) on the same levels and
the same 7-bit activation levels, then rescales in float32: the same integer formula as on the CPU. cuBLASLt's
int8 GEMM wants more than 16 rows and inner and output sizes that are multiples of 8, so the layer pads
(zero rows and columns, which add nothing) and slices the result back.

With calibrated output ranges (``output_absmax``: the largest |y[c]| calibration saw, per output channel) the
layer can also return int8 outputs (:meth:`Int8Linear.forward_levels`): ``q[c] = clamp(round(y[c] * 127 /
absmax[c]), -128, 127)``, requantized inside fbgemm's GEMM (its output stage, with the factors 127 / absmax[c]
folded into the packed rows), so int8 keys and values go into the decoder's cache without a float32 tensor
in between (the int8 attention path of arXiv 2104.05784). Max calibration of the cached K/V ranges is what
TensorRT-LLM's int8 KV cache uses too (one amax per tensor there; per channel here).

Activations use 7 bits (stored as uint8 0..127 with zero point z): without VNNI, x86 int8 GEMMs add pairs of uint8 x int8 products in saturating int16, and full 8-bit
activations overflow it (measured: 255 * 127 * 2 > 32767 gave 3.26 for 412.9). With 7 bits they cannot.
Static (calibrated) scales rather than per-batch ones keep every sentence's output independent of the
other sentences in its batch.
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fairseq_accel.compression.quantization_grid import quantize_to_levels

ACTIVATION_LEVELS = 128  # 7 bits; see the module docstring
SIGNED_ZERO_POINT = 64  # levels -64..63 for inputs of both signs
UNSIGNED_ZERO_POINT = 0  # levels 0..127 for non-negative inputs
BACKEND = "fbgemm"
CUDA_MIN_ROWS = 17  # torch._int_mm on CUDA: more than 16 rows
CUDA_MULTIPLE = 8  # ... and inner and output sizes that are multiples of 8
OUTPUT_LEVEL = 127  # int8 outputs: level 127 is the calibrated absmax of the channel
OUTPUT_ZERO_POINT = 128  # fbgemm writes uint8 outputs; 128 is level 0 (XOR 128 turns them into int8)


def activation_max_level(zero_point: int) -> int:
    """The largest positive activation level with ``zero_point``: 63 (signed) or 127 (non-negative)."""
    return ACTIVATION_LEVELS - 1 - zero_point


def activation_levels(x: Tensor, scale: float, zero_point: int) -> Tensor:
    """The activation levels (as float) of ``x``: ``clamp(round(x * (1 / scale)), -zero_point, 127 - zero_point)``,
    the reciprocal in float32 (a product, as the C++ int8 GEMM and fbgemm quantize)."""
    return torch.clamp(torch.round(x * (1.0 / scale)), -zero_point, activation_max_level(zero_point))


def int8_gemm_available() -> bool:
    """Whether torch has the fbgemm int8 kernels (x86 with AVX2); on other CPUs :class:`Int8Linear` emulates
    the same arithmetic in float32 (on CUDA it runs ``torch._int_mm``)."""
    return BACKEND in torch.backends.quantized.supported_engines


def _prepack(levels: Tensor, row_scales: Tensor, bias: Optional[Tensor]):
    """fbgemm's packed weight. torch 2.13 warns that quantized tensor types will be removed (issue 184982):
    this function and the one op in ``forward`` are the only places that use them, so a later torch only
    needs a new backend here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        quantized = torch._make_per_channel_quantized_tensor(
            levels, row_scales.double(), torch.zeros(levels.size(0), dtype=torch.long), 0
        )
    engine = torch.backends.quantized.engine
    torch.backends.quantized.engine = BACKEND
    try:
        return torch.ops.quantized.linear_prepack(quantized, bias)
    finally:
        torch.backends.quantized.engine = engine


class Int8Linear(nn.Module):
    """``nn.Linear`` with int8 ``levels`` ``[out, in]`` and per-row ``row_scales`` (weight = row_scales[:,
    None] * levels), ``input_scale``: the calibrated activation step (threshold / max level), and
    ``input_zero_point``: 64 for inputs of both signs, 0 for non-negative ones, and optionally
    ``output_absmax`` ``[out]``: the calibrated output ranges that :meth:`forward_levels` maps onto int8."""

    def __init__(self, levels: Tensor, row_scales: Tensor, bias: Optional[Tensor], input_scale: float,
                 input_zero_point: int = SIGNED_ZERO_POINT, output_absmax: Optional[Tensor] = None):
        super().__init__()
        if levels.dtype != torch.int8 or levels.dim() != 2 or row_scales.numel() != levels.size(0):
            raise ValueError(f"Int8Linear needs int8 levels [out, in] and one scale per row, got {levels.dtype} "
                             f"{list(levels.shape)} and {row_scales.numel()} scales")
        if output_absmax is not None and output_absmax.numel() != levels.size(0):
            raise ValueError(f"Int8Linear needs one output range per row, got {output_absmax.numel()} for "
                             f"{levels.size(0)} rows")
        if not input_scale > 0 or input_zero_point not in (SIGNED_ZERO_POINT, UNSIGNED_ZERO_POINT):
            raise ValueError(f"Int8Linear needs a positive activation scale and zero point {SIGNED_ZERO_POINT} or "
                             f"{UNSIGNED_ZERO_POINT}, got {input_scale} and {input_zero_point}")
        self.in_features, self.out_features = levels.size(1), levels.size(0)
        self.register_buffer("levels", levels.contiguous())
        self.register_buffer("row_scales", row_scales.float().reshape(-1).contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self.input_scale = float(input_scale)
        self.input_zero_point = int(input_zero_point)
        # the inputs the 7 bits cover, computed once for the clamp before every GEMM
        self._input_range = (-self.input_zero_point * self.input_scale,
                             activation_max_level(self.input_zero_point) * self.input_scale)
        self._packed = _prepack(self.levels, self.row_scales, self.bias) if int8_gemm_available() else None
        self.register_buffer("output_absmax", None if output_absmax is None else
                             output_absmax.float().reshape(-1).clamp(min=torch.finfo(torch.float32).tiny))
        self._packed_to_levels = None  # the rows times 127 / output_absmax, packed when first needed
        self._native = None  # the C++ int8 GEMM's packed weights, made when first needed

    def __getstate__(self):
        """Copies and pickles leave the C++ packed weights out (they are made again when needed)."""
        return {**self.__dict__, "_native": None}

    def native_weights(self):
        """The C++ int8 GEMM's packed weights of this layer (``_cpu_kernels.Int8Weights``), or None where the
        extension is not built."""
        if self._native is None:
            from fairseq_accel.inference.cpu_kernels import int8_weights

            bias = None if self.bias is None else self.bias.detach()
            self._native = int8_weights(self.levels, self.row_scales * self.input_scale, bias, self.input_scale,
                                        self.input_zero_point)
        return self._native

    @classmethod
    def from_linear(cls, layer: nn.Module, bits: int, input_scale: float,
                    input_zero_point: int = SIGNED_ZERO_POINT) -> "Int8Linear":
        """``layer``'s weight on its per-row ``bits``-bit grid, with the given input quantizer."""
        levels, scales = quantize_to_levels(layer.weight, bits)
        return cls(levels, scales, layer.bias, input_scale, input_zero_point)

    @classmethod
    def fuse(cls, layers: Sequence["Int8Linear"], row_factors: Sequence[Tensor]) -> "Int8Linear":
        """One layer computing ``cat([layer(x) * factor for ...])`` for layers of the same input (and so the
        same calibrated input scale), e.g. the query, key and value projections; exact: each factor only
        multiplies its rows' scales (and biases)."""
        quantizers = {(layer.input_scale, layer.input_zero_point) for layer in layers}
        if len(quantizers) != 1:
            raise ValueError(f"fused int8 layers must share their input scale and zero point, got {sorted(quantizers)}")
        biases = [layer.bias for layer in layers]
        if any(b is None for b in biases) and any(b is not None for b in biases):
            raise ValueError("fused int8 layers must all have biases or none")
        bias = None if biases[0] is None else torch.cat([b * f for b, f in zip(biases, row_factors)])
        ranges = [layer.output_absmax for layer in layers]
        output_absmax = None if any(r is None for r in ranges) else torch.cat(
            [r * f.abs() for r, f in zip(ranges, row_factors)])
        return cls(torch.cat([layer.levels for layer in layers]),
                   torch.cat([layer.row_scales * f for layer, f in zip(layers, row_factors)]), bias,
                   *quantizers.pop(), output_absmax=output_absmax)

    @property
    def weight(self) -> Tensor:
        """The float32 weight these levels stand for (for code that reads a linear layer's weight)."""
        return self.levels.float() * self.row_scales[:, None]

    def quantize_input(self, x: Tensor) -> Tensor:
        """The activation levels (as float) this layer multiplies."""
        return activation_levels(x, self.input_scale, self.input_zero_point)

    def _padded_levels_t(self) -> Tensor:
        """``levels`` transposed to ``[in, out]`` and zero-padded to multiples of 8 (``torch._int_mm``'s
        layout and CUDA's size rule), made once per device."""
        cached = getattr(self, "_levels_t", None)
        if cached is None or cached.device != self.levels.device:
            pad_in, pad_out = (-self.in_features) % CUDA_MULTIPLE, (-self.out_features) % CUDA_MULTIPLE
            cached = F.pad(self.levels.t(), (0, pad_out, 0, pad_in)).contiguous()
            self._levels_t = cached
        return cached

    def int_mm_forward(self, x: Tensor) -> Tensor:
        """``x [rows, in]`` through ``torch._int_mm``: int8 activation levels times int8 weight levels, int32
        accumulation, float32 rescale (the CUDA path; on the CPU the same op computes the same, for tests)."""
        levels_t = self._padded_levels_t()
        q = self.quantize_input(x.float()).to(torch.int8)
        rows = q.size(0)
        q = F.pad(q, (0, levels_t.size(0) - self.in_features, 0, max(CUDA_MIN_ROWS - rows, 0)))
        return self._rescaled(torch._int_mm(q, levels_t)[:rows, : self.out_features].float())

    def _rescaled(self, accumulated: Tensor) -> Tensor:
        """Float32 outputs of the integer products ``accumulated`` (activation levels times weight levels)."""
        y = accumulated * (self.row_scales * self.input_scale)
        return y if self.bias is None else y + self.bias

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, self.in_features)
        native = self.native_weights() if x.device.type == "cpu" and x.dtype == torch.float32 else None
        if native is not None:
            y = native(x)
        elif self._packed is not None and x.device.type == "cpu" and x.dtype == torch.float32:
            # bound x to the 7-bit range first: fbgemm rounds and clamps to 0..255, which could overflow
            x = torch.clamp(x, *self._input_range)
            y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
                x, self.input_scale, self.input_zero_point, self._packed
            )
        elif x.device.type == "cuda":
            y = self.int_mm_forward(x).to(x.dtype)
        else:
            y = self._rescaled(self.quantize_input(x.float()) @ self.levels.float().t()).to(x.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def output_level_factors(self) -> Tensor:
        """``127 / output_absmax``: an output's level is ``round(y * factor)`` (clamped to int8)."""
        return OUTPUT_LEVEL / self.output_absmax

    def forward_levels(self, x: Tensor) -> Tensor:
        """int8 outputs ``q [..., out]``, ``y[c] ~ q[c] * output_absmax[c] / 127`` (module docstring): rounded
        from the float32 outputs; where only fbgemm's int8 GEMM is there (no C++ extension), requantized by
        fbgemm inside the GEMM (same formula)."""
        if self.output_absmax is None:
            raise ValueError("Int8Linear.forward_levels needs calibrated output ranges (output_absmax)")
        shape = x.shape
        x = x.reshape(-1, self.in_features)
        cpu_float = x.device.type == "cpu" and x.dtype == torch.float32
        if self._packed is not None and cpu_float and self.native_weights() is None:
            if self._packed_to_levels is None:
                factors = self.output_level_factors()
                bias = None if self.bias is None else self.bias * factors
                self._packed_to_levels = _prepack(self.levels, self.row_scales * factors, bias)
            x = torch.quantize_per_tensor(torch.clamp(x, *self._input_range), self.input_scale,
                                          self.input_zero_point, torch.quint8)
            y = torch.ops.quantized.linear(x, self._packed_to_levels, 1.0, OUTPUT_ZERO_POINT)
            q = y.int_repr().bitwise_xor_(OUTPUT_ZERO_POINT).view(torch.int8)
        else:
            y = self.forward(x).float() * self.output_level_factors()
            q = torch.clamp(torch.round(y), -OUTPUT_ZERO_POINT, OUTPUT_LEVEL).to(torch.int8)
        return q.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"input_scale={self.input_scale:.4g}, input_zero_point={self.input_zero_point}")
