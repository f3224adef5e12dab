"""The int8 attention path of the fast generator (fairseq_accel/inference/transformer_step.py): with int8
projections that have calibrated output ranges and int8 caches, keys and values are stored as the int8
GEMM's output levels (no scales, no float32 copy) and the attention folds each channel's level step into the
query and the output. Checked step by step against the same int8 layers with float32 caches, over a beam
reordering, for self- and cross-attention (fairseq's, and SAN-M's with its fused key/value projection)."""
from typing import List

import pytest
import torch
from fairseq.modules import MultiheadAttention

import fairseq_accel.plugin  # noqa: F401  (registers the plugin, installs its fairseq patches)
from model_builders import build_speech_model
from fairseq_accel.compression.activation_calibration import cached_projections
from fairseq_accel.inference import cpu_kernels
from fairseq_accel.inference.beam_cache import BeamState
from fairseq_accel.inference.fast_decoder import FastDecodingOptions, FastDecodingUnsupported
from fairseq_accel.inference.sanm_step import SANMCrossAttentionStep
from fairseq_accel.inference.transformer_step import CrossAttentionStep, SelfAttentionStep
from fairseq_accel.modules.int8_linear import Int8Linear
from fairseq_accel.modules.sanm_attention import MultiHeadedCrossAttention

EMBED, HEADS, BATCH, BEAM, STEPS, SOURCE = 32, 4, 2, 3, 5, 7
LEVELS = FastDecodingOptions(kv_cache_dtype="int8", quantize_cross_kv=True)
FLOAT = FastDecodingOptions(kv_cache_dtype="fp32")


def calibrated_int8(layer: torch.nn.Linear, inputs: torch.Tensor) -> Int8Linear:
    """``layer`` as an int8 layer with its input scale and output ranges calibrated (max) on ``inputs``."""
    int8 = Int8Linear.from_linear(layer, 8, float(inputs.abs().max()) / 63)
    ranges = int8(inputs).abs().amax(dim=0)
    return Int8Linear(int8.levels, int8.row_scales, int8.bias, int8.input_scale, int8.input_zero_point, ranges)


def int8_attention(inputs: torch.Tensor, memory: torch.Tensor = None) -> MultiheadAttention:
    """A fairseq attention layer (self-attention, or over ``memory`` if given) with int8 projections."""
    torch.manual_seed(0)
    attention = MultiheadAttention(EMBED, HEADS, self_attention=memory is None,
                                   encoder_decoder_attention=memory is not None)
    for name, source in (("q_proj", inputs), ("k_proj", memory if memory is not None else inputs),
                         ("v_proj", memory if memory is not None else inputs)):
        setattr(attention, name, calibrated_int8(getattr(attention, name), source))
    return attention


def step_inputs() -> List[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(BATCH * BEAM, EMBED, generator=generator) for _ in range(STEPS)]


def run_self_attention(attention: MultiheadAttention, options: FastDecodingOptions,
                       kernels=None) -> List[torch.Tensor]:
    """The step's outputs over ``STEPS`` steps, the beams reordered after each (hypothesis 0 continues 2), on the
    torch path or the C++ ``kernels``."""
    step = SelfAttentionStep(attention, options)
    state = BeamState(BATCH, BEAM, STEPS, torch.device("cpu"), cpu_kernels=kernels)
    step.start(state, options, torch.float32, torch.device("cpu"))
    outputs = []
    for x in step_inputs():
        outputs.append(step(x))
        state.advance(torch.tensor([[2, 1, 1], [0, 0, 2]]))
    if options is LEVELS:
        assert step.int8_levels and step.cache.keys.dtype == torch.int8 and step.cache.key_scale is None
    return outputs


def relative_error(approximate: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approximate - exact).detach().norm() / exact.detach().norm())


@pytest.mark.parametrize("kernels", ["torch", "C++"])
def test_self_attention_on_output_levels_is_the_float_cache_attention(kernels: str) -> None:
    """On the torch path and on the C++ kernel (which rounds the projection's float32 outputs to their levels
    itself); the two agree to float rounding."""
    if kernels == "C++" and not cpu_kernels.cpu_kernels_available():
        pytest.skip("the C++ CPU kernels are not built (pip install -e . with g++)")
    module = cpu_kernels if kernels == "C++" else None
    inputs = torch.cat(step_inputs())
    attention = int8_attention(inputs)
    exact = run_self_attention(attention, FLOAT)
    on_levels = run_self_attention(attention, LEVELS, module)
    errors = [relative_error(a, b) for a, b in zip(on_levels, exact)]
    assert max(errors) < 0.02, errors  # 8-bit keys/values per channel: ~1 % of the attention output
    if module is not None:
        on_torch = run_self_attention(attention, LEVELS)
        assert max(relative_error(a, b) for a, b in zip(on_levels, on_torch)) < 1e-5


def sanm_cross_attention(queries: torch.Tensor, memory: torch.Tensor) -> MultiHeadedCrossAttention:
    torch.manual_seed(0)
    attention = MultiHeadedCrossAttention(HEADS, EMBED, 0.0, EMBED)
    attention.linear_q = calibrated_int8(attention.linear_q, queries)
    attention.linear_k_v = calibrated_int8(attention.linear_k_v, memory)
    return attention


@pytest.mark.parametrize("kind", ["fairseq", "sanm"])
def test_cross_attention_on_output_levels_is_the_float_memory_attention(kind: str) -> None:
    generator = torch.Generator().manual_seed(2)
    memory = torch.randn(SOURCE, BATCH, EMBED, generator=generator)  # fairseq's layout; SAN-M's is batch first
    padding = torch.zeros(BATCH, SOURCE, dtype=torch.bool)
    padding[1, -2:] = True  # the second sentence is shorter
    queries = torch.randn(BATCH * BEAM, EMBED, generator=generator)
    if kind == "fairseq":
        attention, step_class, step_memory = int8_attention(queries, memory.reshape(-1, EMBED)), CrossAttentionStep, memory
    else:
        attention, step_class = sanm_cross_attention(queries, memory.reshape(-1, EMBED)), SANMCrossAttentionStep
        step_memory = memory.transpose(0, 1)
    results = {}
    for name, options in (("float", FLOAT), ("levels", LEVELS)):
        step = step_class(attention, options)
        step.start(BeamState(BATCH, BEAM, 1, torch.device("cpu")), options, step_memory, padding)
        results[name] = step(queries)
        assert (step.level_steps is not None) == (options is LEVELS)
    assert step.memory.keys.dtype == torch.int8 and step.memory.key_scale is None and step.memory.value_scale is None
    assert relative_error(results["levels"], results["float"]) < 0.02


@pytest.mark.parametrize("options", [FastDecodingOptions(kv_cache_dtype="int8"), FLOAT])
def test_layers_without_output_ranges_keep_the_float_path(options: FastDecodingOptions) -> None:
    """Checkpoints compressed before output ranges were calibrated: per-token int8 caches, as before."""
    attention = int8_attention(torch.cat(step_inputs()))
    for name in ("q_proj", "k_proj", "v_proj"):
        layer = getattr(attention, name)
        setattr(attention, name, Int8Linear(layer.levels, layer.row_scales, layer.bias, layer.input_scale))
    step = SelfAttentionStep(attention, options)
    assert not step.int8_levels and step.level_steps is None


def test_projections_quantizing_their_input_differently_are_a_notice_not_a_crash() -> None:
    """One int8 GEMM serves the query, key and value: projections calibrated to different input scales (a checkpoint
    not made by fairseq-accel-compress) make the fast generator step aside with its reason, not a ValueError."""
    attention = int8_attention(step_inputs()[0])
    key = attention.k_proj
    attention.k_proj = Int8Linear(key.levels, key.row_scales, key.bias, key.input_scale * 2, key.input_zero_point,
                                  key.output_absmax)
    with pytest.raises(FastDecodingUnsupported, match="decoder self-attention: fused int8 layers must share their input scale and zero point"):
        SelfAttentionStep(attention, FLOAT)


@pytest.mark.parametrize("arch, expected", [
    ("s2t_sanm_mini", {"src_attn.linear_k_v"}),  # SAN-M's FSMN decoder: no self-attention cache
    ("s2t_transformer_xs", {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "encoder_attn.k_proj",
                            "encoder_attn.v_proj"}),
])
def test_calibration_records_the_outputs_the_caches_take(arch: str, expected: set) -> None:
    """The output ranges calibration records are those of the projections the fast generator caches."""
    model = build_speech_model(arch, encoder_layers=1, decoder_layers=2)
    names = cached_projections(model)
    assert {name.split(".", 3)[3] for name in names} == expected
    assert {name.split(".")[2] for name in names} == {"0", "1"} and all(n.startswith("decoder.") for n in names)
