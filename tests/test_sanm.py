"""SAN-M (and the LSRA speech encoder): FunASR semantics, batch invariance, causality, incremental decoding."""
import argparse
import re
import sys

import pytest
import torch
from fairseq import options
from fairseq.models import ARCH_MODEL_REGISTRY, MODEL_REGISTRY
from fairseq.sequence_generator import SequenceGenerator

import fairseq_accel.plugin  # noqa: F401
from conftest import REPO_ROOT, USER_DIR, cli_output, run_cli
from fairseq_accel.benchmarking import BenchmarkError
from fairseq_accel.cli.benchmark_encoder import padding_removing_encoder
from fairseq_accel.models.s2t_lite_transformer import S2TLiteTransformerModel
from fairseq_accel.models.s2t_sanm import S2TSANMModel
from fairseq_accel.modules.sanm_attention import CausalFSMN, MultiHeadedAttentionSANM
from fairseq_accel.modules.speech_frontend import Conv2dSubsampling, LowFrameRate
from model_builders import build_speech_model, random_tokens
from test_joint_ctc_attention import write_tiny_speech_data

TOLERANCE = 1e-5
SPEECH_MODELS = [
    ("s2t_sanm_mini", {}),
    ("s2t_sanm_mini", {"input_layer": "lfr"}),
    ("s2t_sanm_mini", {"decoder_type": "transformer"}),
    ("s2t_lite_transformer_s", {"encoder_layers": 3, "decoder_layers": 2}),
    ("s2t_lite_transformer_s", {"encoder_layers": 3, "decoder_layers": 2, "input_layer": "lfr"}),
]
LENGTHS = [37, 80, 55]


def test_every_plugin_name_maps_to_our_class():
    assert MODEL_REGISTRY["s2t_sanm"] is S2TSANMModel
    for arch in ["s2t_sanm_s", "s2t_sanm_m", "s2t_sanm_mini"]:
        assert ARCH_MODEL_REGISTRY[arch] is S2TSANMModel
    assert MODEL_REGISTRY["s2t_lite_transformer"] is ARCH_MODEL_REGISTRY["s2t_lite_transformer_s"] is S2TLiteTransformerModel


def utterances(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    features = [torch.randn(n, 80, generator=generator) for n in LENGTHS]
    batch = torch.zeros(len(features), max(LENGTHS), 80)
    for index, utterance in enumerate(features):
        batch[index, : len(utterance)] = utterance
    return features, batch, torch.tensor(LENGTHS)


def encoder_batch_error(model) -> float:
    features, batch, lengths = utterances()
    worst = 0.0
    with torch.no_grad():
        batched = model.encoder(batch, lengths)["encoder_out"][0]
        for index, utterance in enumerate(features):
            alone = model.encoder(utterance[None], lengths[index : index + 1])["encoder_out"][0]
            worst = max(worst, (batched[: alone.size(0), index] - alone[:, 0]).abs().max().item())
    return worst


@pytest.mark.parametrize("arch, overrides", SPEECH_MODELS)
def test_encoder_gives_each_utterance_the_same_output_batched_or_alone(arch, overrides):
    assert encoder_batch_error(build_speech_model(arch, **overrides)) <= TOLERANCE


def test_stock_s2t_transformer_leaks_padding_so_the_check_can_fail():
    assert encoder_batch_error(build_speech_model("s2t_transformer_xs")) > 1e-2


@pytest.mark.parametrize("arch, overrides", SPEECH_MODELS)
def test_encoder_without_padding_equals_the_padded_layout_on_fewer_rows(arch, overrides):
    """Inference packs the valid frames for the position-wise parts: same output at valid frames, and the layers'
    feed-forward sees the valid frames only."""
    model = build_speech_model(arch, **overrides)
    _, batch, lengths = utterances()
    rows = []
    last = model.encoder.layers[-1]
    feed_forward = last.feed_forward.w_1 if hasattr(last, "feed_forward") else last.fc1  # SAN-M, LSRA
    feed_forward.register_forward_hook(lambda module, inputs, output: rows.append(
        inputs[0].numel() // inputs[0].size(-1)))
    outputs = {}
    with torch.no_grad():
        for remove_padding in (True, False):
            model.encoder.remove_padding = remove_padding
            outputs[remove_padding] = model.encoder(batch, lengths)["encoder_out"][0]
    valid = model.encoder.frontend.output_length(lengths)
    assert rows == [int(valid.sum()), int(valid.max()) * len(valid)]
    for column, length in enumerate(valid.tolist()):
        assert torch.allclose(outputs[True][:length, column], outputs[False][:length, column], atol=TOLERANCE)


@pytest.mark.parametrize("arch", ["s2t_sanm_mini", "s2t_lite_transformer_s"])
def test_encoder_benchmark_measures_both_layouts_on_a_trained_checkpoint(arch, tmp_path):
    """scripts/benchmark_speech_encoder.py on a checkpoint from fairseq-train: a table with the padding share, both
    layouts' times and the differences (which must be within the batch-invariance tolerance)."""
    data = write_tiny_speech_data(tmp_path)
    train = run_cli([
        "fairseq-train", data, "--user-dir", USER_DIR, "--task", "speech_to_text", "--config-yaml", "config.yaml",
        "--train-subset", "train", "--valid-subset", "dev", "--arch", arch, "--encoder-layers", "2",
        "--decoder-layers", "1", "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
        "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64", "--criterion", "label_smoothed_cross_entropy",
        "--optimizer", "adam", "--lr", "1e-3", "--max-tokens", "4000", "--max-update", "1", "--cpu",
        "--num-workers", "0", "--save-dir", tmp_path / "checkpoints", "--no-epoch-checkpoints", "--no-save-optimizer-state",
    ])
    assert train.returncode == 0, cli_output(train)
    result = run_cli([sys.executable, REPO_ROOT / "scripts" / "benchmark_speech_encoder.py", data,
                      "--path", tmp_path / "checkpoints" / "checkpoint_last.pt", "--batch-size", "2", "--repeats", "1"])
    assert result.returncode == 0, cli_output(result)
    row = re.search(r"^\| (\d+) \| 2 \| 1 \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| [\d.]+ \| (\S+) \| (\S+) \|$",
                    result.stdout, re.MULTILINE)
    assert row, cli_output(result)
    utterances, padding, padded_s, removed_s, layouts_differ, batch_differs = row.groups()
    assert int(utterances) == 4 and 0 < float(padding) < 100 and float(padded_s) > 0 and float(removed_s) > 0
    assert float(layouts_differ) <= TOLERANCE and float(batch_differs) <= TOLERANCE


def test_encoder_benchmark_refuses_an_encoder_without_a_padding_free_path():
    with pytest.raises(BenchmarkError, match="the encoder of S2TTransformerModel .* has no padding-free path"):
        padding_removing_encoder(build_speech_model("s2t_transformer_xs"))
    assert padding_removing_encoder(build_speech_model("s2t_lite_transformer_s", encoder_layers=1, decoder_layers=1))


@pytest.mark.parametrize("arch, overrides", SPEECH_MODELS)
def test_incremental_decoding_equals_full_forward_and_is_causal(arch, overrides):
    model = build_speech_model(arch, **overrides)
    _, batch, lengths = utterances(1)
    generator = torch.Generator().manual_seed(1)
    tokens = random_tokens(model.decoder.dictionary, 3, 16, generator)
    changed = tokens.clone()
    changed[:, 8:] = random_tokens(model.decoder.dictionary, 3, 8, generator)
    with torch.no_grad():
        encoder_out = model.encoder(batch, lengths)
        full, _ = model.decoder(tokens, encoder_out=encoder_out)
        full_changed, _ = model.decoder(changed, encoder_out=encoder_out)
        state = {}
        for step in range(tokens.size(1)):
            out, _ = model.decoder(tokens[:, : step + 1], encoder_out=encoder_out, incremental_state=state)
            assert (out[:, 0] - full[:, step]).abs().max().item() <= TOLERANCE, f"step {step}"
    assert (full[:, :8] - full_changed[:, :8]).abs().max().item() <= TOLERANCE
    assert (full[:, 8:] - full_changed[:, 8:]).abs().max().item() > 1e-3


@pytest.mark.parametrize("arch, overrides", SPEECH_MODELS[:2])
def test_beam_search_is_the_same_batched_or_alone(arch, overrides):
    model = build_speech_model(arch, **overrides)
    features, batch, lengths = utterances(2)
    search = SequenceGenerator([model], model.decoder.dictionary, beam_size=4, max_len_b=10, min_len=2)
    with torch.no_grad():
        batched = search.forward({"net_input": {"src_tokens": batch, "src_lengths": lengths}})
        for index, utterance in enumerate(features):
            alone = search.forward({"net_input": {"src_tokens": utterance[None], "src_lengths": lengths[index : index + 1]}})
            assert [h["tokens"].tolist() for h in alone[0]] == [h["tokens"].tolist() for h in batched[index]]
            for mine, theirs in zip(alone[0], batched[index]):
                assert abs(mine["score"].item() - theirs["score"].item()) <= 1e-4


def naive_fsmn(v, keep, weight, left):
    """out[t] = (sum_k w[k] * v[t - left + k] + v[t]) * keep[t], with v masked and zero outside."""
    v = v * keep
    time = v.size(1)
    out = torch.zeros_like(v)
    for t in range(time):
        for k in range(weight.size(-1)):
            source = t - left + k
            if 0 <= source < time:
                out[:, t] += weight[:, 0, k] * v[:, source]
    return (out + v) * keep


@pytest.mark.parametrize("kernel_size, shift", [(11, 0), (11, 3), (4, 0)])
def test_encoder_fsmn_follows_funasr_padding_and_masking(kernel_size, shift):
    torch.manual_seed(0)
    attention = MultiHeadedAttentionSANM(2, 8, 8, 0.0, kernel_size, shift).eval()
    v = torch.randn(2, 9, 8)
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[1, 6:] = True
    keep = (~padding).unsqueeze(-1).float()
    expected = naive_fsmn(v, keep, attention.fsmn_block.weight, (kernel_size - 1) // 2 + shift)
    assert torch.allclose(attention.forward_fsmn(v, padding), expected, atol=1e-6)


def test_decoder_fsmn_is_causal():
    torch.manual_seed(0)
    fsmn = CausalFSMN(8, 0.0, 5).eval()
    x = torch.randn(2, 9, 8)
    expected = naive_fsmn(x, torch.ones(2, 9, 1), fsmn.fsmn_block.weight, left=4)
    assert torch.allclose(fsmn(x, None), expected, atol=1e-6)


def test_low_frame_rate_stacks_frames_like_funasr():
    features = torch.arange(2 * 13 * 2, dtype=torch.float32).view(2, 13, 2)
    lengths = torch.tensor([13, 8])
    stacked, out_lengths = LowFrameRate(2, m=7, n=6)(features, lengths)
    assert out_lengths.tolist() == [3, 2]
    for batch_index, length in enumerate(lengths.tolist()):
        frames = features[batch_index, :length]
        padded = torch.cat([frames[:1].repeat(3, 1), frames, frames[-1:].repeat(12, 1)])  # (m-1)//2 in front
        for step in range(out_lengths[batch_index]):
            assert torch.equal(stacked[batch_index, step], padded[step * 6 : step * 6 + 7].reshape(-1))


def test_conv2d_subsampling_lengths():
    assert Conv2dSubsampling.output_length(torch.tensor([7, 8, 100, 101])).tolist() == [1, 1, 24, 24]


def test_too_short_utterance_and_bad_shift_give_clear_errors():
    model = build_speech_model("s2t_sanm_mini")
    with pytest.raises(ValueError, match="an utterance of 5 frames is too short for the Conv2dSubsampling front-end"):
        model.encoder(torch.randn(1, 5, 80), torch.tensor([5]))
    for spelling in ("sanm_shift", "sanm_shfit"):
        with pytest.raises(ValueError, match="--sanm-shift 6 is too large for FSMN kernel size 11"):
            build_speech_model("s2t_sanm_mini", **{spelling: 6})


def parse_training_args(*model_options: str):
    """fairseq-train's own parser (task, arch and model options) on an s2t_sanm_mini command line."""
    parser = options.get_training_parser()
    return options.parse_args_and_arch(
        parser, ["data-bin", "--task", "speech_to_text", "--arch", "s2t_sanm_mini", *model_options]
    )


@pytest.mark.parametrize("spelling", ["--sanm-shift", "--sanm-shfit"])
def test_both_shift_spellings_parse_to_the_documented_option(spelling):
    args = parse_training_args(spelling, "3")
    assert args.sanm_shift == 3 and not hasattr(args, "sanm_shfit")
    assert parse_training_args(spelling, "3", "--sanm-shift", "3").sanm_shift == 3  # agreeing spellings are fine
    layer = build_speech_model("s2t_sanm_mini", **{spelling.lstrip("-").replace("-", "_"): 3}).encoder.layers[0]
    assert layer.self_attn.padding == (5 + 3, 10 - 5 - 3)  # kernel 11: (K-1)//2 + shift on the left


def test_only_the_documented_shift_spelling_is_in_the_help():
    parser = argparse.ArgumentParser()
    S2TSANMModel.add_args(parser)
    help_text = parser.format_help()
    assert "--sanm-shift S" in help_text and "--sanm-shfit" not in help_text


def test_contradicting_shift_spellings_are_one_clear_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_training_args("--sanm-shift", "1", "--sanm-shfit", "2")
    assert exit_info.value.code == 2
    error = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(error) == 1 and "--sanm-shfit 2 contradicts --sanm-shift 1" in error[0]


def test_checkpoint_with_funasr_names_loads_with_identical_output():
    """Earlier checkpoints: the FFN-only decoder layer under ``decoder.decoders3.0`` and ``sanm_shfit`` as option."""
    old_model = build_speech_model("s2t_sanm_mini", sanm_shfit=2, seed=1)
    old_state = {key.replace("decoder.final_ffn.", "decoder.decoders3.0."): value
                 for key, value in old_model.state_dict().items()}
    assert any(key.startswith("decoder.decoders3.0.feed_forward.") for key in old_state)
    new_model = build_speech_model("s2t_sanm_mini", sanm_shfit=2, seed=2)
    assert not any("decoders3" in key for key in new_model.state_dict()), "the new name is final_ffn"
    new_model.load_state_dict(old_state, strict=True)
    features, batch, lengths = utterances()
    tokens = random_tokens(new_model.decoder.dictionary, len(LENGTHS), 6, torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, _ = old_model(batch, lengths, tokens)
        got, _ = new_model(batch, lengths, tokens)
    assert torch.equal(got, expected)
