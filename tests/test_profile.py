"""Parameter and Mult-Add counting (fairseq_accel.profiling) against hand formulas, and fairseq-accel-profile."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fairseq_accel  # noqa: F401  (registers the plugin's architectures)
from fairseq_accel.cli.profile import main
from fairseq_accel.profiling import (
    build_model,
    closest_width,
    count_mult_adds,
    count_parameters,
    mult_adds_of,
    profile_arch,
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
    assert profiled["mult_adds"]["total"] == count_mult_adds(model).total
    assert profiled["parameters"]["total"] == count_parameters(model).total


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
    expected = profile_arch("lite_transformer_iwslt_de_en", {"encoder_embed_dim": 64, "decoder_embed_dim": 64},
                            vocab_size=1000)
    assert result["model"] == expected.to_dict()
    baseline = result["baseline"]
    assert baseline["arch"] == "transformer"
    assert baseline["sizes"] == {
        "encoder_embed_dim": 64, "decoder_embed_dim": 64, "encoder_ffn_embed_dim": 256, "decoder_ffn_embed_dim": 256,
        "encoder_layers": 6, "decoder_layers": 6, "encoder_attention_heads": 4, "decoder_attention_heads": 4,
    }
    assert baseline["mult_adds"]["total"] == transformer_mult_adds(64, 256, layers=6)
