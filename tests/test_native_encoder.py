"""fairseq's transformer encoder in one C++ call (csrc/encoder_cpu.cpp) for models whose encoder layers are int8: its
output is the Python encoder's bit for bit (post- and pre-norm, relu and gelu, learned or sinusoidal positions,
padded batches), the fast generator uses it and decodes what it decodes with the Python encoder; float32 encoders
(stock's own path) and encoders it cannot take keep the Python encoder."""
import logging
from pathlib import Path

import pytest
import torch
from fairseq.sequence_generator import SequenceGenerator
from torch import nn

from conftest import TINY_TRAIN, TINY_TRANSFORMER, USER_DIR, cli_output, run_cli
from model_builders import build_translation_model, random_tokens, toy_dictionary
from test_fast_generator import fast_from
from fairseq_accel.inference import cpu_kernels
from fairseq_accel.inference.int8_execution import call_projection_modules
from fairseq_accel.inference.native_encoder import NativeEncoder, build_native_encoder
from fairseq_accel.modules.int8_linear import Int8Linear

pytestmark = pytest.mark.skipif(not cpu_kernels.cpu_kernels_available(),
                                reason="the C++ CPU kernels are not built (pip install -e . with g++)")

SMALL = dict(encoder_layers=2, decoder_layers=2, encoder_embed_dim=32, decoder_embed_dim=32,
             encoder_ffn_embed_dim=64, decoder_ffn_embed_dim=64, encoder_attention_heads=4, decoder_attention_heads=4)
ENCODERS = {
    "post-norm, relu": SMALL,
    "pre-norm, gelu, embedding norm, learned positions": {
        **SMALL, "encoder_normalize_before": True, "decoder_normalize_before": True, "activation_fn": "gelu",
        "layernorm_embedding": True, "encoder_learned_pos": True},
}


def int8_model(overrides: dict, only=lambda name: True):
    """A toy transformer whose linear layers (those ``only`` names) are int8, as a compressed checkpoint's are."""
    model = build_translation_model("transformer", toy_dictionary(), **overrides)
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and only(f"{parent_name}.{name}"):
                setattr(parent, name, Int8Linear.from_linear(child, 8, 0.05))
    call_projection_modules(model)
    return model


def padded_batch(dictionary, lengths=(9, 4, 7)) -> dict:
    """Sources of different lengths, left-padded as fairseq pads them."""
    tokens = random_tokens(dictionary, len(lengths), max(lengths), torch.Generator().manual_seed(0))
    for row, length in enumerate(lengths):
        tokens[row, : max(lengths) - length] = dictionary.pad()
        tokens[row, -1] = dictionary.eos()
    return {"src_tokens": tokens, "src_lengths": torch.tensor(lengths)}


@pytest.mark.parametrize("name", sorted(ENCODERS))
@pytest.mark.parametrize("lengths", [(9, 4, 7), (6,), (5, 5)])  # padded; unpadded: positions from the table
def test_the_native_encoder_gives_the_python_encoders_output_bit_for_bit(name: str, lengths: tuple) -> None:
    model = int8_model(ENCODERS[name])
    native = build_native_encoder(model.encoder)
    assert isinstance(native, NativeEncoder)
    net_input = padded_batch(model.encoder.dictionary, lengths)
    with torch.no_grad():
        python_out, native_out = model.encoder.forward_torchscript(net_input), native(net_input)
    for key in ("encoder_out", "encoder_padding_mask", "encoder_embedding", "src_lengths"):
        assert torch.equal(python_out[key][0], native_out[key][0]), key


def test_the_generator_decodes_with_the_native_encoder_what_it_decodes_with_the_python_one() -> None:
    model = int8_model(SMALL)
    dictionary = model.encoder.dictionary
    native, python = (fast_from(SequenceGenerator([model], dictionary, beam_size=4, max_len_b=10), [model])
                      for _ in range(2))
    assert isinstance(native.native_encoder, NativeEncoder)
    python.native_encoder = None
    sample = {"net_input": padded_batch(dictionary)}
    for native_list, python_list in zip(native.generate([model], sample), python.generate([model], sample)):
        for a, b in zip(native_list, python_list):
            assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["score"], b["score"])


def test_float_encoders_keep_their_own_path_silently(caplog: pytest.LogCaptureFixture) -> None:
    """Stock decodes float32 encoders with F.multi_head_attention_forward: the fast generator must match it."""
    model = build_translation_model("transformer", toy_dictionary(), **SMALL)
    with caplog.at_level(logging.INFO):
        assert build_native_encoder(model.encoder) is None
    assert not caplog.records


def test_an_encoder_with_float_layers_among_its_int8_ones_stays_in_python_and_says_why(
        caplog: pytest.LogCaptureFixture) -> None:
    model = int8_model(SMALL, only=lambda name: "fc" not in name)
    with caplog.at_level(logging.INFO, logger="fairseq_accel.inference.native_encoder"):
        assert build_native_encoder(model.encoder) is None
    assert [r.getMessage() for r in caplog.records] == [
        "the int8 encoder runs in Python: 4 of its linear layers are not int8"]


def test_fairseq_generate_decodes_a_calibrated_int8_transformer_with_the_native_encoder_as_stock_does(
        tiny_translation_data: Path, tmp_path: Path) -> None:
    """Through the real entry points: a tiny transformer trained, compressed with calibrated activations
    (``fairseq-accel-compress --data``: every linear layer int8), decoded by ``fairseq-generate`` with the fast
    generator (its encoder in C++, the cross-attention keys and values in one C++ call) and with stock's SequenceGenerator
    over the same int8 modules: the same hypotheses."""
    save_dir = tmp_path / "checkpoints"
    train = run_cli(["fairseq-train", tiny_translation_data, "--user-dir", USER_DIR, "--task", "translation_accel",
                     *TINY_TRANSFORMER, *TINY_TRAIN, "--max-update", "30", "--save-dir", save_dir])
    assert train.returncode == 0, cli_output(train)
    compressed = tmp_path / "int8.pt"
    compress = run_cli(["fairseq-accel-compress", "--path", save_dir / "checkpoint_last.pt", "--data",
                        tiny_translation_data, "--calib-batches", "2", "--max-tokens", "60", "--out", compressed])
    assert compress.returncode == 0, cli_output(compress)
    runs = {}
    for name, extra in (("fast", ("--accel-generator", "fast")), ("stock", ())):
        result = run_cli(["fairseq-generate", tiny_translation_data, "--path", compressed, "--gen-subset", "test",
                          "--beam", "3", "--cpu", "--batch-size", "16", "--user-dir", USER_DIR, "--task",
                          "translation_accel", "--int8-min-weights", "0", *extra])
        assert result.returncode == 0, cli_output(result)
        assert ("the int8 encoder runs in C++" in result.stderr) == (name == "fast"), result.stderr[-2000:]
        runs[name] = sorted(line for line in result.stdout.splitlines() if line.startswith("H-"))
    assert len(runs["fast"]) == 40 and runs["fast"] == runs["stock"]
