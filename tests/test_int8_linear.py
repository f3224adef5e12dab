"""The int8 linear layer (fairseq_accel/modules/int8_linear.py): its arithmetic is exactly the documented
integer formula (no int16 saturation even at the extreme levels), rows do not depend on each other, fusing
layers is exact, and the C++ int8 GEMM on each instruction set, fbgemm, the float emulation used off x86 and the
CUDA path (torch._int_mm) compute the same."""
import copy
import os

import pytest
import torch

from fairseq_accel.inference import cpu_kernels
from fairseq_accel.modules.int8_linear import (
    SIGNED_ZERO_POINT,
    UNSIGNED_ZERO_POINT,
    Int8Linear,
    activation_max_level,
    int8_gemm_available,
)

requires_fbgemm = pytest.mark.skipif(not int8_gemm_available(), reason="torch without fbgemm int8 kernels (not x86)")
requires_native = pytest.mark.skipif(cpu_kernels._cpu_kernels is None and os.environ.get("CI") != "true",
                                     reason="the C++ extension is not built (CI=true: it must be)")
NATIVE_ISAS = ["avx512-vnni", "avx2", "baseline"]


def without_native(layer: Int8Linear) -> Int8Linear:
    """``layer`` on fbgemm (or, without it, the float emulation) instead of the C++ int8 GEMM."""
    layer.native_weights = lambda: None
    return layer


def emulated(layer: Int8Linear, x: torch.Tensor) -> torch.Tensor:
    """The layer's float32 emulation: its activation levels times its weight levels, :meth:`_rescaled`."""
    return layer._rescaled(layer.quantize_input(x) @ layer.levels.float().t())


def reference(layer: Int8Linear, x: torch.Tensor) -> torch.Tensor:
    """The module docstring's formula in float64."""
    zero = layer.input_zero_point
    levels = torch.clamp(torch.round(x.double() / layer.input_scale), -zero, activation_max_level(zero))
    y = (levels @ layer.levels.double().t()) * (layer.row_scales.double() * layer.input_scale)
    return y if layer.bias is None else y + layer.bias.double()


def random_layer(rows: int, columns: int, seed: int, bias: bool = True, zero_point: int = SIGNED_ZERO_POINT) -> Int8Linear:
    generator = torch.Generator().manual_seed(seed)
    levels = torch.randint(-127, 128, (rows, columns), generator=generator, dtype=torch.int8)
    scales = torch.rand(rows, generator=generator) * 0.01 + 1e-3
    return Int8Linear(levels, scales, torch.randn(rows, generator=generator) if bias else None, 0.05, zero_point)


@requires_fbgemm
@pytest.mark.parametrize("backend", ["native", "fbgemm"])
@pytest.mark.parametrize("zero_point", [SIGNED_ZERO_POINT, UNSIGNED_ZERO_POINT])
def test_extreme_levels_do_not_saturate(zero_point: int, backend: str) -> None:
    """All weights +-127 and all activations at the range ends: pairs of stored products reach 2 * 127 * 127,
    which full 8-bit activations would push past int16 (the layer uses 7 bits for exactly this)."""
    levels = torch.full((4, 256), 127, dtype=torch.int8)
    levels[1] = -127
    levels[2, ::2] = -127
    layer = Int8Linear(levels, torch.full((4,), 0.01), None, 0.01, zero_point)
    if backend == "fbgemm":
        without_native(layer)
    low, high = -zero_point * 0.01, activation_max_level(zero_point) * 0.01
    x = torch.stack([torch.full((256,), high), torch.full((256,), low), torch.linspace(low, high, 256),
                     torch.full((256,), 5.0)])  # the last row lies beyond the range: clipped to its top
    y = layer(x)
    assert torch.allclose(y.double(), reference(layer, x), rtol=1e-6, atol=1e-6)
    assert torch.allclose(y[3], y[0])
    assert y[0, 0] > 100  # 256 * 0.63 * 1.27 or more: not a saturated sum


@requires_fbgemm
@pytest.mark.parametrize("backend", ["native", "fbgemm"])
@pytest.mark.parametrize("zero_point", [SIGNED_ZERO_POINT, UNSIGNED_ZERO_POINT])
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_int8_gemm_is_the_integer_formula(rows: int, zero_point: int, backend: str) -> None:
    layer = random_layer(96, 64, seed=rows, zero_point=zero_point)
    if backend == "fbgemm":
        without_native(layer)
    x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(100 + rows)) * 1.5
    if zero_point == UNSIGNED_ZERO_POINT:
        x = x.relu()
    assert torch.allclose(layer(x).double(), reference(layer, x), rtol=1e-5, atol=1e-4)


def test_rows_are_independent_of_their_batch() -> None:
    """One static input scale: a sentence's output does not depend on what else is in the batch."""
    layer = random_layer(32, 48, seed=3)
    x = torch.randn(6, 48, generator=torch.Generator().manual_seed(4))
    together = layer(x)
    x_louder = torch.cat([x[:1], 100 * x[1:]])
    assert torch.equal(layer(x_louder)[0], together[0])
    assert torch.equal(layer(x[2:3])[0], together[2])
    assert layer(x.view(2, 3, 48)).shape == (2, 3, 32)


def test_fused_layers_compute_the_scaled_concatenation() -> None:
    layers = [random_layer(16, 24, seed=s) for s in (5, 6, 7)]
    factors = [torch.full((16,), 0.125), torch.rand(16) + 0.5, torch.ones(16)]
    fused = Int8Linear.fuse(layers, factors)
    x = torch.randn(5, 24)
    expected = torch.cat([layer(x) * f for layer, f in zip(layers, factors)], dim=-1)
    assert torch.allclose(fused(x), expected, rtol=1e-5, atol=1e-5)
    layers[1].input_scale = 0.5
    with pytest.raises(ValueError, match="share their input scale and zero point"):
        Int8Linear.fuse(layers, factors)


@requires_fbgemm
@pytest.mark.parametrize("zero_point", [SIGNED_ZERO_POINT, UNSIGNED_ZERO_POINT])
def test_float_emulation_matches_the_int8_gemm(zero_point: int) -> None:
    """Off x86 (or on other devices) the layer emulates the same arithmetic in float32."""
    layer = random_layer(40, 32, seed=8, zero_point=zero_point)
    x = torch.randn(7, 32)
    int8 = layer(x)
    without_native(layer)._packed = None
    assert torch.allclose(layer(x), int8, rtol=1e-5, atol=1e-4)


@requires_native
@pytest.mark.parametrize("isa", NATIVE_ISAS)
@pytest.mark.parametrize("zero_point", [SIGNED_ZERO_POINT, UNSIGNED_ZERO_POINT])
@pytest.mark.parametrize("bias", [True, False])
def test_native_int8_gemm_is_the_emulation_bit_for_bit_on_every_instruction_set(isa: str, zero_point: int,
                                                                                  bias: bool) -> None:
    """The C++ GEMM's tiles (up to 6 rows x 64 columns), their edges (rows and columns that do not fill a tile,
    inputs that are not a multiple of 4) and its quantization give exactly the emulation's float32 outputs (and
    with the fused relu, their relu)."""
    weights = random_layer(1, 1, seed=0).native_weights()
    if isa not in NATIVE_ISAS[NATIVE_ISAS.index(cpu_kernels._cpu_kernels.int8_gemm_isa()):]:
        with pytest.raises(RuntimeError, match=f"does not support '{isa}'"):
            weights.run(torch.zeros(1, 1), isa)
        pytest.skip(f"this CPU has no {isa}")
    for outputs, inputs in [(93, 61), (17, 5), (64, 256), (130, 9)]:
        layer = random_layer(outputs, inputs, seed=outputs, bias=bias, zero_point=zero_point)
        for rows in (1, 3, 5, 6, 9, 13, 40):
            x = torch.randn(rows, inputs, generator=torch.Generator().manual_seed(rows)) * 3
            assert torch.equal(layer.native_weights().run(x, isa), emulated(layer, x)), (outputs, inputs, rows)
            assert torch.equal(layer.native_weights().run(x, isa, relu=True), torch.relu(emulated(layer, x)))
    extreme = Int8Linear(torch.full((20, 256), -127, dtype=torch.int8), torch.full((20,), 0.01), None, 0.01, zero_point)
    x = torch.full((3, 256), activation_max_level(zero_point) * 0.01)
    assert torch.equal(extreme.native_weights().run(x, isa), emulated(extreme, x))  # no int16 saturation (AVX2)


def test_native_int8_gemm_is_used_where_built_and_left_out_of_copies() -> None:
    layer = random_layer(24, 16, seed=1)
    x = torch.randn(5, 16)
    y = layer(x)
    if cpu_kernels._cpu_kernels is None:
        assert layer.native_weights() is None
        return
    assert torch.equal(y, emulated(layer, x)) and layer._native is not None
    copied = copy.deepcopy(layer)
    assert copied._native is None and torch.equal(copied(x), y)


@pytest.mark.parametrize("rows", [1, 5, 40])
def test_int_mm_path_is_the_integer_formula(rows: int) -> None:
    """The CUDA path's arithmetic, run by the same op on the CPU: sizes that are not multiples of 8 and fewer
    than 17 rows are padded for cuBLASLt and sliced back without changing a value."""
    layer = random_layer(93, 61, seed=20 + rows)
    x = torch.randn(rows, 61, generator=torch.Generator().manual_seed(rows)) * 1.5
    assert layer.int_mm_forward(x).shape == (rows, 93)
    assert torch.allclose(layer.int_mm_forward(x).double(), reference(layer, x), rtol=1e-5, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("rows", [5, 160])
def test_cuda_runs_the_integer_formula(rows: int) -> None:
    """On a GPU the layer is a cuBLASLt int8 GEMM (torch._int_mm) with the CPU's arithmetic."""
    layer = random_layer(1000, 256, seed=30)
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(31))
    on_gpu = layer.cuda()(x.cuda()).cpu()
    assert torch.allclose(on_gpu.double(), reference(layer.cpu(), x), rtol=1e-5, atol=1e-4)


def test_weight_is_the_dequantized_levels() -> None:
    layer = random_layer(8, 8, seed=9, bias=False)
    assert torch.equal(layer.weight, layer.levels.float() * layer.row_scales[:, None])
    with pytest.raises(ValueError, match="one scale per row"):
        Int8Linear(layer.levels, layer.row_scales[:4], None, 0.1)


def with_output_ranges(layer: Int8Linear, x: torch.Tensor, shrink: float = 1.0) -> Int8Linear:
    """``layer`` with output ranges calibrated on ``x`` (times ``shrink``, so that some outputs lie beyond)."""
    ranges = layer(x).abs().amax(dim=0) * shrink
    return Int8Linear(layer.levels, layer.row_scales, layer.bias, layer.input_scale, layer.input_zero_point, ranges)


def level_reference(layer: Int8Linear, x: torch.Tensor) -> torch.Tensor:
    """The module docstring's output levels, from the float64 formula."""
    return torch.clamp(torch.round(reference(layer, x) * 127 / layer.output_absmax.double()), -128, 127)


@pytest.mark.parametrize("gemm", ["fbgemm", "float"])
def test_output_levels_are_the_calibrated_ranges_on_127_levels(gemm: str) -> None:
    """int8 outputs: the calibrated range of each channel is level 127, outputs beyond it clamp; fbgemm's
    requantization inside the GEMM and the float path (CUDA, other CPUs) give the formula's levels."""
    if gemm == "fbgemm" and not int8_gemm_available():
        pytest.skip("torch without fbgemm int8 kernels (not x86)")
    x = torch.randn(9, 48, generator=torch.Generator().manual_seed(40)) * 2
    layer = with_output_ranges(random_layer(64, 48, seed=41), x, shrink=0.8)
    if gemm == "float":
        layer._packed = None
    levels = layer.forward_levels(x)
    assert levels.dtype == torch.int8 and levels.shape == (9, 64)
    difference = (levels.double() - level_reference(layer, x)).abs()
    assert difference.max() <= 1 and (difference > 0).float().mean() < 0.01  # ties of float rounding only
    assert levels.max() == 127 and levels.min() == -128  # the 0.8 ranges: the largest outputs clamp
    with pytest.raises(ValueError, match="needs calibrated output ranges"):
        random_layer(4, 48, seed=42).forward_levels(x)


def test_fused_output_levels_are_each_layers_levels() -> None:
    """Fusing scales each layer's output ranges by its row factor, so the levels do not change."""
    x = torch.randn(6, 24, generator=torch.Generator().manual_seed(43))
    layers = [with_output_ranges(random_layer(16, 24, seed=s), x) for s in (44, 45)]
    factors = [torch.full((16,), 0.125), torch.rand(16, generator=torch.Generator().manual_seed(46)) + 0.5]
    fused = Int8Linear.fuse(layers, factors)
    expected = torch.cat([layer.forward_levels(x) for layer in layers], dim=-1)
    assert (fused.forward_levels(x).int() - expected.int()).abs().max() <= 1
    layers[1] = random_layer(16, 24, seed=45)  # one layer without ranges: the fused layer has none
    assert Int8Linear.fuse(layers, factors).output_absmax is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_output_levels_are_the_cpu_levels() -> None:
    x = torch.randn(40, 256, generator=torch.Generator().manual_seed(47))
    layer = with_output_ranges(random_layer(512, 256, seed=48), x, shrink=0.9)
    on_cpu = layer.forward_levels(x)
    on_gpu = layer.cuda().forward_levels(x.cuda()).cpu()
    assert (on_gpu.int() - on_cpu.int()).abs().max() <= 1
