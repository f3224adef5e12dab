"""The fast generator's whole float32 decoder step in C++ (csrc/decoder_step_cpu.cpp, built from the Python step
objects by their ``native()`` methods) decodes exactly what the Python step decodes: the same hypotheses, scores
and positional scores, bit for bit, for every decoder it serves (fairseq transformer pre- and post-norm, relu and
gelu; LSRA's attention + lightweight or dynamic convolution branches, with and without GLU; SAN-M's FSMN decoder;
s2t_transformer), through sentences leaving the batch at different steps. Models it does not serve keep the
Python step and say why in one line."""
import logging
import re

import pytest
import torch
from fairseq.sequence_generator import SequenceGenerator

from test_fast_generator import fast_from
from model_builders import build_speech_model, build_translation_model, random_tokens, toy_dictionary
from fairseq_accel.inference import cpu_kernels
from fairseq_accel.inference.fast_decoder import FastDecoder
from fairseq_accel.inference.fast_generator import _BeamSearch
from fairseq_accel.modules.int8_linear import Int8Linear

pytestmark = pytest.mark.skipif(not cpu_kernels.cpu_kernels_available(),
                                reason="the C++ CPU kernels are not built (pip install -e . with g++)")

SMALL = dict(encoder_layers=2, decoder_layers=2, encoder_embed_dim=32, decoder_embed_dim=32,
             encoder_ffn_embed_dim=64, decoder_ffn_embed_dim=64, encoder_attention_heads=4, decoder_attention_heads=4)
LSRA = dict(encoder_layers=2, decoder_layers=2, encoder_embed_dim=32, decoder_embed_dim=32,
            encoder_branch_type=["attn:1:16:2", "dynamic:default:16:2"], encoder_glu=True,
            decoder_branch_type=["attn:1:16:2", "lightweight:default:16:2"])
MODELS = {
    "transformer post-norm": ("translation", "transformer", SMALL),
    "transformer pre-norm, gelu, embedding norm": ("translation", "transformer", {
        **SMALL, "decoder_normalize_before": True, "encoder_normalize_before": True, "activation_fn": "gelu",
        "layernorm_embedding": True}),
    "lite_transformer lightweight": ("translation", "lite_transformer_mini", {**LSRA, "decoder_glu": False}),
    "lite_transformer lightweight + glu": ("translation", "lite_transformer_mini", {**LSRA, "decoder_glu": True}),
    "lite_transformer dynamic + glu": ("translation", "lite_transformer_mini", {
        **LSRA, "decoder_branch_type": ["attn:1:16:2", "dynamic:default:16:2"], "decoder_glu": True}),
    "s2t_sanm": ("speech", "s2t_sanm_mini", dict(encoder_layers=2, decoder_layers=2)),
    "s2t_sanm gelu": ("speech", "s2t_sanm_mini", dict(encoder_layers=2, decoder_layers=2, activation_fn="gelu")),
    "s2t_transformer": ("speech", "s2t_transformer_s", dict(encoder_layers=2, decoder_layers=2)),
}


def build(kind: str, arch: str, overrides: dict):
    """A model and a batch of four sources of different lengths."""
    dictionary = toy_dictionary()
    builder = build_speech_model if kind == "speech" else build_translation_model
    model = builder(arch, dictionary, **overrides)
    generator = torch.Generator().manual_seed(0)
    lengths = torch.tensor([11, 7, 9, 4])
    if kind == "speech":
        features = torch.randn(len(lengths), 80, 80, generator=generator)
        lengths = lengths * 7
        for row, length in enumerate(lengths):
            features[row, length:] = 0
        return model, dictionary, {"net_input": {"src_tokens": features, "src_lengths": lengths}}
    tokens = random_tokens(dictionary, len(lengths), int(lengths.max()), generator)
    for row, length in enumerate(lengths):  # fairseq's left padding of the source
        tokens[row, : len(tokens[row]) - length] = dictionary.pad()
        tokens[row, -1] = dictionary.eos()
    return model, dictionary, {"net_input": {"src_tokens": tokens, "src_lengths": lengths}}


def fast_generator(model, dictionary, beam: int, **options):
    return fast_from(SequenceGenerator([model], dictionary, beam_size=beam, max_len_b=20), [model], **options)


def drive(decoder, encoder_out: dict, batch: int, beam: int, dictionary, steps: int = 6) -> list:
    """The generator's calls on ``decoder`` with random choices (seeded): step (the first one on the first beam's
    rows only), a finished sentence leaving at step 2, advance to random parents; returns every step's logits."""
    choices = torch.Generator().manual_seed(1)
    decoder.start(encoder_out, beam, steps + 1)
    tokens = torch.full((batch * beam,), dictionary.eos())
    logits = []
    for step in range(steps):
        logits.append(decoder.step(tokens, torch.arange(batch) * beam if step == 0 else None))
        if step == 2:
            decoder.keep(torch.tensor([0, 2, 3]))
            batch = 3
        decoder.advance(torch.randint(beam, (batch, beam), generator=choices))
        tokens = torch.randint(dictionary.nspecial, len(dictionary), (batch * beam,), generator=choices)
    return logits


def drive_both(model, sample, dictionary, native, python) -> tuple:
    """Both decoders' logits (``drive``) on the same encoder output; the first one must have built its C++ step."""
    with torch.no_grad():
        encoder_out = model.encoder.forward_torchscript(sample["net_input"])
        logits = tuple(drive(d, encoder_out, 4, 4, dictionary) for d in (native, python))
    assert isinstance(native.native_step, cpu_kernels.native_kernels().DecoderStep)
    return logits


@pytest.mark.parametrize("name", sorted(MODELS))
def test_native_step_gives_the_python_steps_logits_through_reorders_and_finished_sentences(name: str) -> None:
    model, dictionary, sample = build(*MODELS[name])
    native, python = (fast_generator(model, dictionary, 4).fast_decoder for _ in range(2))
    python.native_step = False  # the Python step with the same kernels
    native_logits, python_logits = drive_both(model, sample, dictionary, native, python)
    assert all(torch.equal(a, b) for a, b in zip(native_logits, python_logits))


@pytest.mark.parametrize("beam", [1, 5])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_native_step_decodes_what_the_python_step_decodes(name: str, beam: int) -> None:
    model, dictionary, sample = build(*MODELS[name])
    native, python = fast_generator(model, dictionary, beam), fast_generator(model, dictionary, beam)
    python.fast_decoder.native_step = False
    native_hyps, python_hyps = native.generate([model], sample), python.generate([model], sample)
    assert isinstance(native.fast_decoder.native_step, cpu_kernels.native_kernels().DecoderStep)
    for native_list, python_list in zip(native_hyps, python_hyps):
        assert len(native_list) == len(python_list) == beam
        for a, b in zip(native_list, python_list):
            assert torch.equal(a["tokens"], b["tokens"])
            assert torch.equal(a["score"], b["score"]) and torch.equal(a["positional_scores"], b["positional_scores"])


@pytest.mark.parametrize("name", ["transformer pre-norm, gelu, embedding norm", "lite_transformer dynamic + glu",
                                  "s2t_sanm"])
def test_the_native_search_loop_hands_back_finished_sentences_and_decodes_what_the_python_loop_decodes(
        name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The C++ search loop (csrc/beam_search_loop_cpu.cpp) against the Python loop over the same C++ step: the same
    hypotheses, scores and positional scores, with sentences finishing at different steps (the loop returns each
    time, the generator drops them from its buffers and the caches, and the loop goes on with the rest)."""
    model, dictionary, sample = build(*MODELS[name])
    with torch.no_grad():  # EOS likelier (its output row 3x larger): the random model's sentences end before max_len
        model.decoder.output_projection.weight[dictionary.eos()] *= 3
    looped, stepped = fast_generator(model, dictionary, 5), fast_generator(model, dictionary, 5)
    calls = []  # (active sentences, positions that finished, done) of every call into the C++ loop
    run_native_search = FastDecoder.run_native_search

    def counted(decoder, loop, tokens, scores, cands_to_ignore, sentence_ids):
        result = run_native_search(decoder, loop, tokens, scores, cands_to_ignore, sentence_ids)
        calls.append((len(sentence_ids), result[1], result[2]))
        return result

    monkeypatch.setattr(FastDecoder, "run_native_search", counted)
    looped_hyps = looped.generate([model], sample)
    monkeypatch.setattr(_BeamSearch, "_run_native_loop", _BeamSearch._run_steps)
    stepped_hyps = stepped.generate([model], sample)
    assert stepped.fast_decoder.native_caches is not None  # the C++ step under the Python loop
    assert len(calls) >= 2 and calls[-1][2] and not any(done for *_, done in calls[:-1])
    assert calls[0][0] == 4
    assert all(later[0] == earlier[0] - len(earlier[1]) for earlier, later in zip(calls, calls[1:]))
    for looped_list, stepped_list in zip(looped_hyps, stepped_hyps):
        assert len(looped_list) == len(stepped_list) == 5
        for a, b in zip(looped_list, stepped_list):
            assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["score"], b["score"])
            assert torch.equal(a["positional_scores"], b["positional_scores"])


@pytest.mark.parametrize("name", [name for name in sorted(MODELS) if "sanm" not in name])
def test_native_step_with_the_int8_cache_decodes_what_the_python_step_decodes(name: str) -> None:
    """The int8 self-attention cache (per-token scales) in the C++ step: the Python step runs the same C++ cache
    kernel, so hypotheses and scores are identical."""
    model, dictionary, sample = build(*MODELS[name])
    native, python = (fast_generator(model, dictionary, 5, kv_cache_dtype="int8") for _ in range(2))
    python.fast_decoder.native_step = False
    native_hyps, python_hyps = native.generate([model], sample), python.generate([model], sample)
    assert isinstance(native.fast_decoder.native_step, cpu_kernels.native_kernels().DecoderStep)
    for native_list, python_list in zip(native_hyps, python_hyps):
        for a, b in zip(native_list, python_list):
            assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["score"], b["score"])


@pytest.mark.parametrize("options,reason", [
    ({"kv_cache_dtype": "int8", "quantize_cross_kv": True}, "a cross-attention memory of int8 or float16 has no C"),
    ({"kv_cache_dtype": "fp16"}, "the fp16 self-attention cache has no C\\+\\+ step"),
])
def test_models_without_a_native_step_keep_the_python_step_and_say_why(options: dict, reason: str, caplog) -> None:
    model, dictionary, sample = build("translation", "transformer", SMALL)
    generator = fast_generator(model, dictionary, 5, **options)
    with caplog.at_level(logging.INFO, logger="fairseq_accel.inference.fast_decoder"):
        generator.generate([model], sample)
        generator.generate([model], sample)
    notices = [r.getMessage() for r in caplog.records if "Python step" in r.getMessage()]
    assert len(notices) == 1 and re.search(reason, notices[0]), notices
    assert generator.fast_decoder.native_caches is None


def test_torch_kernels_keep_the_python_step() -> None:
    model, dictionary, sample = build(*MODELS["transformer post-norm"])
    generator = fast_generator(model, dictionary, 5, accel_kernels="torch")
    generator.generate([model], sample)
    assert generator.fast_decoder.native_step is None and generator.fast_decoder.native_caches is None


def test_layers_without_float_weights_are_called_back_from_the_native_step() -> None:
    """A linear step that is not a float32 TransposedLinear (an int8 layer of a compressed checkpoint) runs as
    itself, called from C++: here a Python function in place of the first layer's fc1."""
    model, dictionary, sample = build(*MODELS["transformer post-norm"])
    native, python = (fast_generator(model, dictionary, 4).fast_decoder for _ in range(2))
    python.native_step = False
    calls = []
    for decoder in (native, python):
        fc1 = decoder.layers[0].fc1
        decoder.layers[0].fc1 = lambda x, fc1=fc1, owner=decoder: (calls.append(owner), fc1(x) * 1.5)[1]
    native_logits, python_logits = drive_both(model, sample, dictionary, native, python)
    assert calls.count(native) == calls.count(python) == len(native_logits)
    assert all(torch.equal(a, b) for a, b in zip(native_logits, python_logits))


def test_int8_layers_run_the_native_int8_gemm_inside_the_native_step() -> None:
    """A compressed checkpoint's Int8Linear runs in the C++ step on its packed weights (the module is not called
    back) and gives the Python step's logits exactly."""
    model, dictionary, sample = build(*MODELS["transformer post-norm"])
    native, python = (fast_generator(model, dictionary, 4).fast_decoder for _ in range(2))
    python.native_step = False
    module_calls = []
    for decoder in (native, python):
        fc1 = decoder.layers[0].fc1
        float_layer = torch.nn.Linear(fc1.weight_t.size(0), fc1.weight_t.size(1))
        float_layer.weight.data, float_layer.bias.data = fc1.weight_t.t().clone(), fc1.bias.clone()
        int8 = Int8Linear.from_linear(float_layer, 8, 0.05)
        int8.register_forward_hook(lambda *_, owner=decoder: module_calls.append(owner))
        decoder.layers[0].fc1 = int8
    native_logits, python_logits = drive_both(model, sample, dictionary, native, python)
    assert module_calls.count(native) == 0 and module_calls.count(python) == len(python_logits)
    assert all(torch.equal(a, b) for a, b in zip(native_logits, python_logits))


def test_the_int8_attention_path_runs_in_the_native_step() -> None:
    """Self-attention projections with calibrated output ranges and an int8 cache (the int8 attention path): the C++
    step stores their output levels and attends over them, giving the Python step's logits exactly."""
    model, dictionary, sample = build(*MODELS["transformer post-norm"])
    for layer in model.decoder.layers:
        for name in ("q_proj", "k_proj", "v_proj"):
            int8 = Int8Linear.from_linear(getattr(layer.self_attn, name), 8, 0.05)
            ranges = torch.full((int8.out_features,), 2.0)  # some outputs beyond: their levels clamp
            setattr(layer.self_attn, name, Int8Linear(int8.levels, int8.row_scales, int8.bias, int8.input_scale,
                                                      int8.input_zero_point, ranges))
    native, python = (fast_generator(model, dictionary, 4, kv_cache_dtype="int8").fast_decoder for _ in range(2))
    python.native_step = False
    native_logits, python_logits = drive_both(model, sample, dictionary, native, python)
    assert native.layers[0].self_attn.int8_levels and native.layers[0].self_attn.cache.keys.dtype == torch.int8
    assert all(torch.equal(a, b) for a, b in zip(native_logits, python_logits))


def test_int8_cross_attention_keys_and_values_are_projected_in_one_native_call() -> None:
    """Int8 cross-attention key/value projections: every layer's keys and values of the encoder output come from one
    C++ call (``MemoryProjections``, the modules are not called) and equal the layers' own projections, so the
    logits are those of the Python step, which projects layer by layer."""
    model, dictionary, sample = build(*MODELS["transformer post-norm"])
    for layer in model.decoder.layers:
        for name in ("k_proj", "v_proj"):
            setattr(layer.encoder_attn, name, Int8Linear.from_linear(getattr(layer.encoder_attn, name), 8, 0.05))
    native, python = (fast_generator(model, dictionary, 4).fast_decoder for _ in range(2))
    python.native_step, python.memory_projections = False, False
    module_calls = []
    for layer in model.decoder.layers:
        for name in ("k_proj", "v_proj"):
            getattr(layer.encoder_attn, name).register_forward_hook(lambda *_: module_calls.append(1))
    native_logits, python_logits = drive_both(model, sample, dictionary, native, python)
    assert isinstance(native.memory_projections, cpu_kernels.native_kernels().MemoryProjections)
    assert len(module_calls) == 2 * len(model.decoder.layers)  # the Python decoder's, once per layer and projection
    for native_layer, python_layer in zip(native.layers, python.layers):
        assert torch.equal(native_layer.cross_attn.memory.keys, python_layer.cross_attn.memory.keys)
        assert torch.equal(native_layer.cross_attn.memory.values, python_layer.cross_attn.memory.values)
    assert all(torch.equal(a, b) for a, b in zip(native_logits, python_logits))
