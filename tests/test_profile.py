"""fairseq-accel-profile and fairseq_accel.profiling against counts derived by hand.

What is counted (profiling.py's docstring): Mult-Adds are the multiply-accumulates of every matrix product
of a teacher-forced forward pass of one sentence (batch 1) — linear layers (weights only, no bias),
attention ``Q·Kᵀ`` and ``·V`` over the full matrices, convolution taps — with the output projection onto
the vocabulary reported on its own; parameters are counted once each. The expected numbers below are
written out as arithmetic from the layer shapes, and parameter totals are also checked against
``sum(p.numel())`` of the same configuration built by tests/model_builders.py (not by the profiler).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fairseq_accel.plugin  # noqa: F401  (registers the plugin's architectures)
from model_builders import build_speech_model, build_translation_model, toy_dictionary
from fairseq_accel.cli.profile import main
from fairseq_accel.profiling import (
    build_model,
    closest_width,
    count_mult_adds,
    count_parameters,
    mult_adds_of,
    resolve_arch_args,
)

REPO = Path(__file__).resolve().parents[1]
SRC_LEN, TGT_LEN, VOCAB = 7, 5, 20  # unequal lengths catch a swapped source/target


def attention(dim: int, queries: int, keys: int) -> int:
    """Q/K/V/out projections plus Q·Kᵀ and ·V of one multi-head attention (heads do not change the count)."""
    return (queries + 2 * keys + queries) * dim * dim + 2 * queries * keys * dim


def ffn(dim: int, hidden: int, steps: int) -> int:
    return 2 * steps * dim * hidden


def conv_branch(dim: int, steps: int, kernel: int, heads: int, glu: bool, dynamic: bool) -> int:
    """linear_in (doubled for GLU), kernel prediction (dynamic only), depthwise taps, linear_out."""
    per_step = dim * (2 * dim if glu else dim) + (dim * heads * kernel if dynamic else 0) + dim * kernel + dim * dim
    return steps * per_step


def small_transformer(**overrides):
    options = dict(encoder_layers=1, decoder_layers=1, encoder_embed_dim=16, decoder_embed_dim=16,
                   encoder_ffn_embed_dim=24, decoder_ffn_embed_dim=24,
                   encoder_attention_heads=2, decoder_attention_heads=2)
    options.update(overrides)
    return build_model(resolve_arch_args("transformer", options), VOCAB, VOCAB)


def test_transformer_mult_adds_match_hand_formula():
    d, f = 16, 24
    counts = count_mult_adds(small_transformer(), SRC_LEN, TGT_LEN)
    assert counts.encoder == attention(d, SRC_LEN, SRC_LEN) + ffn(d, f, SRC_LEN)
    assert counts.decoder == (
        attention(d, TGT_LEN, TGT_LEN) + attention(d, TGT_LEN, SRC_LEN) + ffn(d, f, TGT_LEN)
    )
    assert counts.output_projection == TGT_LEN * d * VOCAB
    assert counts.total == counts.encoder + counts.decoder


@pytest.mark.parametrize(
    "overrides, token, positional, projection",
    [
        ({}, 2 * VOCAB * 16, 0, VOCAB * 16),
        ({"share_decoder_input_output_embed": True}, 2 * VOCAB * 16, 0, 0),
        ({"share_all_embeddings": True}, VOCAB * 16, 0, 0),
        # fairseq sizes learned positions max_positions + padding_idx + 1 (1024 + 1 + 1)
        ({"encoder_learned_pos": True, "decoder_learned_pos": True}, 2 * VOCAB * 16, 2 * 1026 * 16, VOCAB * 16),
    ],
)
def test_transformer_parameters_exclude_embeddings(overrides, token, positional, projection):
    d, f = 16, 24
    attention_params = 4 * (d * d + d) + 2 * d  # projections with biases, then its layer norm
    ffn_params = (d * f + f) + (f * d + d) + 2 * d
    counts = count_parameters(small_transformer(**overrides))
    assert counts.non_embedding == (attention_params + ffn_params) + (2 * attention_params + ffn_params)
    assert (counts.token_embeddings, counts.positional_embeddings, counts.output_projection) == (
        token, positional, projection
    )


@pytest.mark.parametrize("conv, glu", [("lightweight", False), ("dynamic", True)])
def test_lsra_mult_adds_match_hand_formula(conv, glu):
    """1+1-layer LSRA, d 32 = attention 16 (4 heads) + convolution 16 (2 heads); flattened FFN (32)."""
    d, half, conv_heads, enc_kernel, dec_kernel = 32, 16, 2, 3, 5
    branches = [f"attn:1:{half}:4", f"{conv}:default:{half}:{conv_heads}"]
    model_cfg = resolve_arch_args("lite_transformer_mini", dict(
        encoder_layers=1, decoder_layers=1, encoder_embed_dim=d, decoder_embed_dim=d,
        encoder_branch_type=branches, decoder_branch_type=branches,
        encoder_kernel_size_list=[enc_kernel], decoder_kernel_size_list=[dec_kernel],
        encoder_glu=glu, decoder_glu=glu,
    ))
    counts = count_mult_adds(build_model(model_cfg, VOCAB, VOCAB), SRC_LEN, TGT_LEN)
    dynamic = conv == "dynamic"
    assert counts.encoder == (
        attention(half, SRC_LEN, SRC_LEN)
        + conv_branch(half, SRC_LEN, enc_kernel, conv_heads, glu, dynamic)
        + ffn(d, d, SRC_LEN)
    )
    assert counts.decoder == (
        attention(half, TGT_LEN, TGT_LEN)
        + conv_branch(half, TGT_LEN, dec_kernel, conv_heads, glu, dynamic)
        + attention(d, TGT_LEN, SRC_LEN)
        + ffn(d, d, TGT_LEN)
    )
    assert counts.output_projection == TGT_LEN * d * VOCAB


def test_depthwise_conv1d_and_einsum_counts():
    channels, steps, kernel, heads = 12, 9, 5, 3
    x = torch.randn(1, channels, steps + kernel - 1)
    _, depthwise = mult_adds_of(F.conv1d, x, torch.randn(channels, 1, kernel), groups=channels)
    _, grouped = mult_adds_of(F.conv1d, x, torch.randn(channels, channels // heads, kernel), groups=heads)
    assert depthwise == steps * channels * kernel
    assert grouped == steps * channels * (channels // heads) * kernel
    windows = torch.randn(steps, 1, heads, channels // heads, kernel)
    weights = torch.randn(steps, 1, heads, kernel)
    _, einsum = mult_adds_of(torch.einsum, "tbhrk,tbhk->tbhr", windows, weights)
    assert einsum == steps * channels * kernel


def test_closest_width_brackets_the_target():
    quadratic = lambda width: 3 * width * width + 50 * width  # noqa: E731
    assert closest_width(quadratic, quadratic(320) + 10, step=8) == 320
    assert closest_width(quadratic, quadratic(328) - 10, step=8) == 328
    assert closest_width(quadratic, 1, step=8) == 8
    cubic = lambda width: width**3  # noqa: E731  (a poor first guess: the walk must still get there)
    assert closest_width(cubic, 96**3 + 5, step=8) == 96


def test_match_mult_adds_finds_a_baseline_within_ten_percent(capsys):
    model_args = ["--arch", "lite_transformer_mini", "--encoder-embed-dim", "64", "--decoder-embed-dim", "64"]
    assert main(model_args + ["--vocab-size", "100", "--match-mult-adds", "--format", "json"]) == 0
    result = json.loads(capsys.readouterr().out)
    model, baseline = result["model"]["mult_adds"]["total"], result["baseline"]["mult_adds"]["total"]
    assert abs(baseline - model) <= 0.1 * model
    sizes = result["baseline"]["sizes"]
    assert sizes["encoder_embed_dim"] % 8 == 0 and sizes["encoder_ffn_embed_dim"] == 4 * sizes["encoder_embed_dim"]
    assert (sizes["encoder_layers"], sizes["decoder_layers"]) == (3, 3)  # copied from the model


def test_unknown_arch_is_one_line_with_close_matches(capsys):
    assert main(["--arch", "lite_transfomer_mini"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown arch 'lite_transfomer_mini'" in err[0] and "lite_transformer_mini" in err[0]


def test_missing_checkpoint_is_one_line(tmp_path, capsys):
    assert main(["--path", str(tmp_path / "none.pt")]) == 2
    message = capsys.readouterr().err.strip()
    assert message == f"fairseq-accel-profile: error: checkpoint not found: {tmp_path / 'none.pt'}"


@pytest.mark.filterwarnings("ignore::UserWarning")  # hydra deprecation notes from fairseq's checkpoint loader
def test_checkpoint_is_profiled_with_its_vocabularies(tmp_path, capsys):
    model_cfg = resolve_arch_args("lite_transformer_mini", dict(encoder_layers=1, decoder_layers=1,
                                                                encoder_embed_dim=32, decoder_embed_dim=32))
    model = build_model(model_cfg, 50, 60)
    path = tmp_path / "checkpoint.pt"
    torch.save({
        "args": model_cfg,
        "model": model.state_dict(),
        "optimizer_history": [{"criterion_name": "CrossEntropyCriterion", "optimizer_name": "Adam",
                               "lr_scheduler_state": {"best": 0.0}, "num_updates": 0}],
        "extra_state": {"train_iterator": {"epoch": 1}},
    }, path)
    assert main(["--path", str(path), "--no-baseline", "--format", "json"]) == 0
    profiled = json.loads(capsys.readouterr().out)["model"]
    assert profiled["arch"] == "lite_transformer_mini"
    assert (profiled["src_vocab_size"], profiled["tgt_vocab_size"]) == (50, 60)
    # 1+1 layers, d 32: attention on 16 channels beside a lightweight convolution on 16 (4 heads, kernel 3
    # in both layers: the paper's first kernel), flattened FFN (hidden 32); 30 source and 30 target tokens.
    assert profiled["mult_adds"]["total"] == (
        attention(16, 30, 30) + conv_branch(16, 30, 3, 4, glu=False, dynamic=False) + ffn(32, 32, 30)  # encoder
        + attention(16, 30, 30) + conv_branch(16, 30, 3, 4, glu=False, dynamic=False)  # decoder self-attention
        + attention(32, 30, 30) + ffn(32, 32, 30)  # cross-attention, FFN
    )
    assert profiled["parameters"]["total"] == sum(p.numel() for p in model.parameters())


def transformer_mult_adds(dim: int, hidden: int, layers: int, steps: int = 30) -> int:
    """Stock transformer, ``layers`` + ``layers``, ``steps`` source and target tokens."""
    encoder = attention(dim, steps, steps) + ffn(dim, hidden, steps)
    decoder = 2 * attention(dim, steps, steps) + ffn(dim, hidden, steps)
    return layers * (encoder + decoder)


def test_stock_arch_takes_its_own_options(capsys):
    argv = ["--arch", "transformer", "--encoder-layers", "2", "--decoder-layers", "2", "--vocab-size", "1000",
            "--no-baseline", "--format", "json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["baseline"] is None
    assert result["model"]["mult_adds"]["total"] == transformer_mult_adds(512, 2048, layers=2)
    assert result["model"]["mult_adds"]["output_projection"] == 30 * 512 * 1000


def test_cli_process_lsra_beside_stock_transformer():
    """The entry point run as a process: an LSRA arch beside its default baseline, a stock transformer."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "fairseq_accel.cli.profile", "--arch", "lite_transformer_iwslt_de_en",
               "--encoder-embed-dim", "64", "--decoder-embed-dim", "64", "--vocab-size", "1000", "--format", "json"]
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    model = result["model"]
    # 6+6 layers, d 64: attention on 32 channels beside a lightweight convolution on 32 (4 heads), kernels
    # 3 7 15 31 31 31 per layer, flattened FFN (hidden 64); the decoder adds full cross-attention.
    kernels = [3, 7, 15, 31, 31, 31]
    lsra = [attention(32, 30, 30) + conv_branch(32, 30, k, 4, glu=False, dynamic=False) for k in kernels]
    assert model["mult_adds"]["encoder"] == sum(lsra) + 6 * ffn(64, 64, 30)
    assert model["mult_adds"]["decoder"] == sum(lsra) + 6 * (attention(64, 30, 30) + ffn(64, 64, 30))
    assert model["mult_adds"]["output_projection"] == 30 * 64 * 1000
    built = build_translation_model("lite_transformer_iwslt_de_en", toy_dictionary(1000 - 4),
                                    encoder_embed_dim=64, decoder_embed_dim=64)
    assert model["parameters"]["total"] == sum(p.numel() for p in built.parameters())
    # unshared: source and target embeddings and the output projection, each 1000 x 64
    assert (model["parameters"]["token_embeddings"], model["parameters"]["output_projection"]) == (2 * 64000, 64000)
    baseline = result["baseline"]
    assert baseline["arch"] == "transformer"
    assert baseline["sizes"] == {
        "encoder_embed_dim": 64, "decoder_embed_dim": 64, "encoder_ffn_embed_dim": 256, "decoder_ffn_embed_dim": 256,
        "encoder_layers": 6, "decoder_layers": 6, "encoder_attention_heads": 4, "decoder_attention_heads": 4,
    }
    assert baseline["mult_adds"]["total"] == transformer_mult_adds(64, 256, layers=6)


def cli_model_profile(capsys, *argv: str) -> dict:
    """The model's profile as ``fairseq-accel-profile --format json --no-baseline`` prints it."""
    assert main([*argv, "--no-baseline", "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)["model"]


def test_cli_transformer_counts_match_hand_arithmetic(capsys):
    """1+1-layer transformer, d 16, FFN 24, 20-word joined vocabulary, 7 source and 5 target tokens."""
    profile = cli_model_profile(capsys, "--arch", "transformer", "--encoder-layers", "1", "--decoder-layers", "1",
                                "--encoder-embed-dim", "16", "--decoder-embed-dim", "16",
                                "--encoder-ffn-embed-dim", "24", "--decoder-ffn-embed-dim", "24",
                                "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
                                "--vocab-size", "20", "--src-len", "7", "--tgt-len", "5")
    assert profile["mult_adds"]["encoder"] == (
        7 * 16 * 16 * 4  # Q, K, V and output projections of 7 steps
        + 7 * 7 * 16 * 2  # Q·Kᵀ and weights·V (heads split the 16 channels, so they do not change the count)
        + 7 * 16 * 24 * 2  # FFN 16 -> 24 -> 16
    )
    assert profile["mult_adds"]["decoder"] == (
        5 * 16 * 16 * 4 + 5 * 5 * 16 * 2  # self-attention over the 5 target steps
        + 5 * 16 * 16 * 2 + 7 * 16 * 16 * 2 + 5 * 7 * 16 * 2  # cross-attention: Q/out on 5 steps, K/V on 7
        + 5 * 16 * 24 * 2  # FFN
    )
    assert profile["mult_adds"]["output_projection"] == 5 * 16 * 20
    attention_parameters = 4 * (16 * 16 + 16) + 2 * 16  # four projections with biases, layer norm
    ffn_parameters = (16 * 24 + 24) + (24 * 16 + 16) + 2 * 16
    parameters = profile["parameters"]
    assert parameters["non_embedding"] == attention_parameters + ffn_parameters + 2 * attention_parameters + ffn_parameters
    assert (parameters["token_embeddings"], parameters["positional_embeddings"]) == (2 * 20 * 16, 0)  # sinusoidal
    assert parameters["output_projection"] == 20 * 16
    built = build_translation_model("transformer", toy_dictionary(20 - 4), encoder_layers=1, decoder_layers=1,
                                    encoder_embed_dim=16, decoder_embed_dim=16, encoder_ffn_embed_dim=24,
                                    decoder_ffn_embed_dim=24, encoder_attention_heads=2, decoder_attention_heads=2)
    assert parameters["total"] == sum(p.numel() for p in built.parameters())


@pytest.mark.parametrize("conv", ["lightweight", "dynamic"])
def test_cli_lsra_counts_match_hand_arithmetic(capsys, conv):
    """1+1-layer LSRA, d 32 = attention 16 (4 heads) + convolution 16 (2 heads), kernel 3 / 5 (encoder /
    decoder), GLU with the dynamic convolution, flattened FFN (32), 20 words, 7 -> 5 tokens."""
    glu = conv == "dynamic"
    options = ["--encoder-layers", "1", "--decoder-layers", "1", "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
               "--encoder-branch-type", "attn:1:16:4", f"{conv}:default:16:2",
               "--decoder-branch-type", "attn:1:16:4", f"{conv}:default:16:2",
               "--encoder-kernel-size-list", "3", "--decoder-kernel-size-list", "5",
               "--encoder-glu", str(glu), "--decoder-glu", str(glu)]
    profile = cli_model_profile(capsys, "--arch", "lite_transformer_mini", *options,
                                "--vocab-size", "20", "--src-len", "7", "--tgt-len", "5")

    def conv_mult_adds(steps: int, kernel: int) -> int:
        return steps * (
            16 * (32 if glu else 16)  # linear_in (doubled before the GLU)
            + (16 * 2 * kernel if conv == "dynamic" else 0)  # a kernel of `kernel` taps per head, predicted per step
            + 16 * kernel  # depthwise taps
            + 16 * 16  # linear_out
        )

    assert profile["mult_adds"]["encoder"] == (
        7 * 16 * 16 * 4 + 7 * 7 * 16 * 2  # attention branch on 16 channels
        + conv_mult_adds(7, 3)
        + 7 * 32 * 32 * 2  # flattened FFN
    )
    assert profile["mult_adds"]["decoder"] == (
        5 * 16 * 16 * 4 + 5 * 5 * 16 * 2 + conv_mult_adds(5, 5)  # LSRA self-attention
        + 5 * 32 * 32 * 2 + 7 * 32 * 32 * 2 + 5 * 7 * 32 * 2  # cross-attention on all 32 channels
        + 5 * 32 * 32 * 2  # FFN
    )
    assert profile["mult_adds"]["output_projection"] == 5 * 32 * 20
    arch_options = dict(encoder_layers=1, decoder_layers=1, encoder_embed_dim=32, decoder_embed_dim=32,
                        encoder_branch_type=["attn:1:16:4", f"{conv}:default:16:2"],
                        decoder_branch_type=["attn:1:16:4", f"{conv}:default:16:2"],
                        encoder_kernel_size_list=[3], decoder_kernel_size_list=[5], encoder_glu=glu, decoder_glu=glu)
    built = build_translation_model("lite_transformer_mini", toy_dictionary(20 - 4), **arch_options)
    assert profile["parameters"]["total"] == sum(p.numel() for p in built.parameters())


def test_cli_s2t_sanm_counts_match_hand_arithmetic(capsys):
    """1+1-layer SAN-M, d 16, FFN 24, FSMN kernel 3, conv2d front-end with 4 channels, 20 words; 30 frames of
    80 filterbank features and 5 target tokens."""
    options = ["--encoder-layers", "1", "--decoder-layers", "1", "--encoder-embed-dim", "16", "--decoder-embed-dim", "16",
               "--encoder-ffn-embed-dim", "24", "--decoder-ffn-embed-dim", "24", "--encoder-attention-heads", "2",
               "--decoder-attention-heads", "2", "--sanm-kernel-size", "3", "--decoder-kernel-size", "3",
               "--conv-out-channels", "4"]
    profile = cli_model_profile(capsys, "--arch", "s2t_sanm_mini", *options, "--vocab-size", "20",
                                "--src-len", "30", "--tgt-len", "5")
    # conv2d front-end: 3x3 stride 2 twice: 30 x 80 -> 14 x 39 -> 6 x 19, then a linear 4 * 19 -> 16 per frame
    frontend = 14 * 39 * 4 * 9 + 6 * 19 * 4 * (4 * 9) + 6 * (4 * 19) * 16
    encoder_layer = (
        6 * 16 * 48  # fused Q/K/V projection 16 -> 3 x 16 of the 6 frames
        + 6 * 6 * 16 * 2  # Q·Kᵀ and weights·V
        + 6 * 16 * 16  # linear_out
        + 6 * 16 * 3  # FSMN: depthwise convolution, 3 taps per channel
        + 6 * 16 * 24 * 2  # FFN
    )
    decoder_layer = (
        5 * 16 * 24 * 2  # FFN 16 -> 24 -> 16
        + 5 * 16 * 3  # causal FSMN, 3 taps
        + 5 * 16 * 16 + 6 * 16 * 32 + 5 * 6 * 16 * 2 + 5 * 16 * 16  # cross-attention: Q, fused K/V, products, out
    )
    final_ffn = 5 * 16 * 24 * 2  # the FFN-only last layer
    assert profile["src_vocab_size"] is None and profile["tgt_vocab_size"] == 20
    assert profile["mult_adds"]["encoder"] == frontend + encoder_layer
    assert profile["mult_adds"]["decoder"] == decoder_layer + final_ffn
    assert profile["mult_adds"]["output_projection"] == 5 * 16 * 20
    parameters = profile["parameters"]
    assert (parameters["token_embeddings"], parameters["output_projection"]) == (20 * 16, 20 * 16)  # unshared
    assert parameters["non_embedding"] == (
        (4 * 9 + 4) + (4 * 4 * 9 + 4) + (4 * 19 * 16 + 16)  # front-end convolutions and projection
        + (16 * 48 + 48) + (16 * 16 + 16) + 16 * 3 + (16 * 24 + 24) + (24 * 16 + 16) + 2 * 2 * 16  # encoder layer
        + 2 * 16  # encoder's final norm
        + (16 * 24 + 24) + 2 * 24 + 24 * 16 + 2 * 16  # decoder FFN (norm inside, w_2 without bias), its norm
        + 16 * 3 + 2 * 16  # causal FSMN and its norm
        + (16 * 16 + 16) + (16 * 32 + 32) + (16 * 16 + 16) + 2 * 16  # cross-attention and its norm
        + (16 * 24 + 24) + 2 * 24 + 24 * 16 + 2 * 16  # final FFN layer
        + 2 * 16  # decoder's final norm
    )
    built = build_speech_model("s2t_sanm_mini", toy_dictionary(20 - 4), encoder_layers=1, decoder_layers=1,
                               encoder_embed_dim=16, decoder_embed_dim=16, encoder_ffn_embed_dim=24,
                               decoder_ffn_embed_dim=24, encoder_attention_heads=2, decoder_attention_heads=2,
                               sanm_kernel_size=3, decoder_kernel_size=3, conv_out_channels=4)
    assert parameters["total"] == sum(p.numel() for p in built.parameters())
