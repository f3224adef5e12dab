"""joint_ctc_attention: the loss functions against direct computations, CTC greedy decoding and error
counting on hand-made inputs, the criterion on a stock s2t_transformer, and fairseq-train/-generate."""
import csv
import itertools
import json
import math
import re
from pathlib import Path
from typing import List

import numpy as np
import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F
from fairseq import checkpoint_utils, options, tasks
from fairseq.criterions import CRITERION_REGISTRY
from fairseq.data import Dictionary
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.logging import metrics

import fairseq_accel.plugin  # noqa: F401  (registers the criterion)
from conftest import USER_DIR, cli_output, run_cli
from fairseq_accel.criterions.joint_ctc_attention import (
    JointCTCAttentionCriterion,
    build_text_decoder,
    check_ctc_weight,
    count_errors,
    ctc_loss_sum,
    ctc_targets,
    joint_ctc_attention_loss,
)
from fairseq_accel.models.ctc_head import (
    CTCHeadError,
    build_ctc_head,
    ctc_best_paths,
    ctc_log_probs,
    encoder_out_of,
    find_ctc_head,
)
from fairseq_accel.tasks.accel_generation import AccelGenerationConfig, AccelGenerationError, build_ctc_generator

BLANK = 0


# --------------------------------------------------------------------------------------------
# Loss math.
# --------------------------------------------------------------------------------------------
def brute_force_ctc(lprobs: torch.Tensor, labels: List[int], blank: int = BLANK) -> float:
    """-log Σ over every frame path that collapses to ``labels`` (T x V log-probs of one sentence)."""
    frames, vocab = lprobs.shape
    total = 0.0
    for path in itertools.product(range(vocab), repeat=frames):
        collapsed = [s for s, _ in itertools.groupby(path) if s != blank]
        if collapsed == labels:
            total += math.exp(sum(float(lprobs[t, s]) for t, s in enumerate(path)))
    return -math.log(total)


def test_ctc_loss_is_a_sum_over_sentences_not_a_mean_over_labels():
    torch.manual_seed(0)
    lprobs = torch.randn(4, 2, 3).log_softmax(-1)  # T=4, B=2, V=3
    labels, label_lengths = torch.tensor([1, 2, 1, 2, 2]), torch.tensor([2, 3])
    frames = torch.tensor([4, 4])
    expected = brute_force_ctc(lprobs[:, 0], [1, 2]) + brute_force_ctc(lprobs[:, 1], [1, 2, 2])
    got = ctc_loss_sum(lprobs, frames, labels, label_lengths, blank=BLANK)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # fairseq divides by sample_size later; F.ctc_loss's "mean" would already divide by label counts
    mean = F.ctc_loss(lprobs, labels, frames, label_lengths, blank=BLANK, reduction="mean")
    assert got.item() != pytest.approx(mean.item() * 2, rel=1e-3)


def test_ctc_loss_uses_only_the_valid_frames_and_zero_infinity():
    torch.manual_seed(1)
    lprobs = torch.randn(3, 2, 3).log_softmax(-1)
    labels, label_lengths = torch.tensor([1, 2, 1, 2]), torch.tensor([1, 3])
    # sentence 1 has 2 valid frames for labels 1 2 1 (needs at least 3 frames): infeasible
    frames = torch.tensor([2, 2])
    assert math.isinf(ctc_loss_sum(lprobs, frames, labels, label_lengths, BLANK, zero_infinity=False).item())
    got = ctc_loss_sum(lprobs, frames, labels, label_lengths, BLANK, zero_infinity=True)
    assert got.item() == pytest.approx(brute_force_ctc(lprobs[:2, 0], [1]), rel=1e-5)


def test_ctc_targets_drop_padding_and_eos():
    pad, eos = 1, 2
    target = torch.tensor([[5, 6, 7, eos], [8, eos, pad, pad]])
    labels, lengths = ctc_targets(target, pad, eos)
    assert labels.tolist() == [5, 6, 7, 8]
    assert lengths.tolist() == [3, 1]


@pytest.mark.parametrize("weight", [0.0, 0.3, 1.0])
def test_joint_loss_weights_ce_and_ctc(weight):
    ce = torch.tensor(4.0, requires_grad=True)
    ctc = torch.tensor(10.0, requires_grad=True)
    loss = joint_ctc_attention_loss(ce, ctc, weight)
    assert loss.item() == pytest.approx((1 - weight) * 4.0 + weight * 10.0)
    loss.backward()
    assert ce.grad.item() == pytest.approx(1 - weight)  # weight 1: zero, but still in the graph
    assert (ctc.grad.item() if ctc.grad is not None else 0.0) == pytest.approx(weight)


def test_joint_loss_without_ctc_needs_weight_zero():
    ce = torch.tensor(4.0)
    assert joint_ctc_attention_loss(ce, None, 0.0) is ce
    with pytest.raises(ValueError, match="CTC loss is needed"):
        joint_ctc_attention_loss(ce, None, 0.3)


@pytest.mark.parametrize("weight", [-0.1, 1.5])
def test_ctc_weight_outside_unit_interval_is_one_clear_error(weight):
    with pytest.raises(ValueError, match=r"--ctc-weight must be in \[0, 1\]"):
        check_ctc_weight(weight)


# --------------------------------------------------------------------------------------------
# Greedy decoding, text, error counts.
# --------------------------------------------------------------------------------------------
def one_hot_lprobs(paths: List[List[int]], vocab: int) -> torch.Tensor:
    """T x B x V log-probs whose argmax per frame follows ``paths`` (equal lengths)."""
    lprobs = torch.full((len(paths[0]), len(paths), vocab), -5.0)
    for b, path in enumerate(paths):
        for t, symbol in enumerate(path):
            lprobs[t, b, symbol] = -0.1
    return lprobs


def test_greedy_decode_merges_repeats_then_drops_blanks():
    lprobs = one_hot_lprobs([[0, 3, 3, 0, 3, 4, 4, 0], [5, 5, 0, 5, 6, 6, 6, 6]], vocab=7)
    # a blank between two equal symbols keeps both; frames past a sentence's length are ignored
    lprobs[1, 0, 3] = -0.05  # the token's score is its best frame
    paths = ctc_best_paths(lprobs, torch.tensor([8, 4]), BLANK)
    assert [path.tokens for path in paths] == [[3, 3, 4], [5, 5]]
    assert paths[0].scores == pytest.approx([-0.05, -0.1, -0.1])
    assert [path.tokens for path in ctc_best_paths(lprobs, torch.tensor([1, 0]), BLANK)] == [[], []]


def test_count_errors_counts_words_and_characters_without_spaces():
    counts = count_errors("the cat sat", "the bat sat on")
    assert (counts.word_errors, counts.words) == (2, 4)  # one substitution, one deletion
    assert (counts.char_errors, counts.chars) == (3, 11)  # thecatsat vs thebatsaton
    assert count_errors("", "a b") == (2, 2, 2, 2)
    assert count_errors("x", "") == (1, 0, 1, 0)


def test_text_decoder_applies_post_process_then_the_subword_model():
    dictionary = Dictionary()
    ids = [dictionary.add_symbol(piece) for piece in ["\u2581t", "he", "\u2581c", "at"]]
    assert build_text_decoder(dictionary, "sentencepiece")(ids + [dictionary.eos()]) == "the cat"
    assert build_text_decoder(dictionary)(ids[:2]) == "\u2581t he"

    class Upper:
        def decode(self, text: str) -> str:
            return text.upper()

    assert build_text_decoder(dictionary, "sentencepiece", bpe=Upper())(ids) == "THE CAT"


def test_reduce_metrics_normalises_by_sample_size_and_reports_error_rates():
    logs = [
        {"loss": 7.0, "ce_loss": 5.0, "nll_loss": 4.0, "ctc_loss": 12.0, "ntokens": 10, "nsentences": 2,
         "sample_size": 10, "ctc_word_errors": 1, "ctc_words": 4, "ctc_char_errors": 2, "ctc_chars": 20},
        {"loss": 3.0, "ce_loss": 2.0, "nll_loss": 1.0, "ctc_loss": 4.0, "ntokens": 6, "nsentences": 1,
         "sample_size": 6, "ctc_word_errors": 2, "ctc_words": 2, "ctc_char_errors": 0, "ctc_chars": 5},
    ]
    with metrics.aggregate() as agg:
        JointCTCAttentionCriterion.reduce_metrics(logs)
        values = agg.get_smoothed_values()
    assert values["loss"] == pytest.approx(10.0 / 16 / math.log(2), abs=1e-3)
    assert values["ce_loss"] == pytest.approx(7.0 / 16 / math.log(2), abs=1e-3)
    assert values["ctc_loss"] == pytest.approx(16.0 / 16 / math.log(2), abs=1e-3)
    assert values["ctc_wer"] == pytest.approx(50.0)
    assert values["ctc_cer"] == pytest.approx(8.0)
    training_logs = [{k: v for k, v in log.items() if not k.startswith("ctc_") or k == "ctc_loss"} for log in logs]
    with metrics.aggregate() as agg:
        JointCTCAttentionCriterion.reduce_metrics(training_logs)
        assert "ctc_wer" not in agg.get_smoothed_values()


# --------------------------------------------------------------------------------------------
# The model contract and its errors.
# --------------------------------------------------------------------------------------------
def test_build_ctc_head_follows_the_ctc_weight_switch():
    class Args:
        ctc_weight = 0.3

    head = build_ctc_head(Args(), encoder_dim=8, vocab_size=11)
    assert (head.in_features, head.out_features) == (8, 11)
    Args.ctc_weight = 0.0
    assert build_ctc_head(Args(), 8, 11) is None


def test_model_without_ctc_head_is_a_clear_error():
    model = torch.nn.Module()
    model.encoder = torch.nn.Module()
    with pytest.raises(CTCHeadError, match="has no CTC head"):
        find_ctc_head(model)


def test_decoder_without_encoder_out_is_a_clear_error():
    with pytest.raises(CTCHeadError, match=r"net_output\[1\]\['encoder_out'\]"):
        encoder_out_of((torch.zeros(1), {"attn": [None]}))


def test_encoder_output_without_padding_mask_is_a_clear_error():
    head = torch.nn.Linear(4, 5)
    with pytest.raises(CTCHeadError, match="no 'encoder_padding_mask'"):
        ctc_log_probs(head, {"encoder_out": [torch.zeros(3, 2, 4)]})


def test_ctc_log_probs_take_lengths_from_the_padding_mask():
    head = torch.nn.Linear(4, 5)
    features = torch.randn(3, 2, 4)
    mask = torch.tensor([[False, False, False], [False, True, True]])
    lprobs, lengths = ctc_log_probs(head, {"encoder_out": [features], "encoder_padding_mask": [mask]})
    assert lprobs.shape == (3, 2, 5) and lengths.tolist() == [3, 1]
    assert torch.allclose(lprobs.exp().sum(-1), torch.ones(3, 2))
    _, lengths = ctc_log_probs(head, {"encoder_out": [features], "encoder_padding_mask": []})
    assert lengths.tolist() == [3, 3]


# --------------------------------------------------------------------------------------------
# A tiny speech_to_text data set, the criterion in process, and the fairseq CLIs.
# --------------------------------------------------------------------------------------------
WORDS = "the cat sat on a mat dog ran to big red sun".split()
SPLITS = {"train": 24, "dev": 8, "test": 4}
TINY_S2T = [
    "--arch", "s2t_transformer_xs", "--encoder-layers", "2", "--decoder-layers", "1",
    "--encoder-embed-dim", "64", "--decoder-embed-dim", "64", "--encoder-ffn-embed-dim", "128",
    "--decoder-ffn-embed-dim", "128", "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
    "--conv-channels", "64",
]


def write_tiny_speech_data(root: Path) -> Path:
    """Random 80-dim "fbank" .npy files, manifests (id audio n_frames tgt_text speaker), a character
    sentencepiece model with its fairseq vocabulary, and config.yaml; returns ``root``."""
    rng = np.random.default_rng(0)
    sentences = {
        split: [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 5)))) for _ in range(size)]
        for split, size in SPLITS.items()
    }
    text = root / "spm_text.txt"
    text.write_text("".join(s + "\n" for ss in sentences.values() for s in ss), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(root / "spm_char"), model_type="char", vocab_size=1000,
        hard_vocab_limit=False, bos_id=-1, eos_id=-1, unk_id=0, minloglevel=2,
    )
    pieces = spm.SentencePieceProcessor(model_file=str(root / "spm_char.model"))
    (root / "spm_char.txt").write_text(
        "".join(f"{pieces.id_to_piece(i)} 1\n" for i in range(pieces.get_piece_size()) if not pieces.is_unknown(i)),
        encoding="utf-8",
    )
    (root / "fbank").mkdir()
    for split, texts in sentences.items():
        with open(root / f"{split}.tsv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, lineterminator="\n")
            writer.writerow(["id", "audio", "n_frames", "tgt_text", "speaker"])
            for i, sentence in enumerate(texts):
                frames = 8 * len(sentence) + 20  # >= 4 frames per character after 4x subsampling
                path = root / "fbank" / f"{split}{i}.npy"
                np.save(path, rng.standard_normal((frames, 80)).astype(np.float32))
                writer.writerow([f"{split}{i}", path, frames, sentence, "spk0"])
    (root / "config.yaml").write_text(
        "input_feat_per_channel: 80\nvocab_filename: spm_char.txt\n"
        "bpe_tokenizer:\n  bpe: sentencepiece\n  sentencepiece_model: spm_char.model\n",
        encoding="utf-8",
    )
    return root


@pytest.fixture(scope="module")
def tiny_speech_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_speech_data(tmp_path_factory.mktemp("tiny_speech"))


def build_like_fairseq_train(data: Path, *extra: str):
    """(task, model, criterion) built the way fairseq-train builds them, from command-line arguments."""
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(
        parser,
        [str(data), "--task", "speech_to_text", "--config-yaml", "config.yaml", *TINY_S2T,
         "--criterion", "joint_ctc_attention", "--dropout", "0", "--cpu", *extra],
    )
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    return task, model, task.build_criterion(cfg.criterion)


def test_registered_with_the_documented_defaults(tiny_speech_data):
    assert CRITERION_REGISTRY["joint_ctc_attention"] is JointCTCAttentionCriterion
    _, _, criterion = build_like_fairseq_train(tiny_speech_data)
    assert (criterion.ctc_weight, criterion.eps, criterion.ctc_zero_infinity) == (0.3, 0.1, True)
    _, _, criterion = build_like_fairseq_train(tiny_speech_data, "--ctc-zero-infinity", "false")
    assert criterion.ctc_zero_infinity is False
    _, _, criterion = build_like_fairseq_train(tiny_speech_data, "--ctc-zero-infinity")
    assert criterion.ctc_zero_infinity is True


def test_criterion_on_stock_s2t_transformer(tiny_speech_data):
    task, model, criterion = build_like_fairseq_train(tiny_speech_data, "--ctc-weight", "0.3")
    head = model.encoder.ctc_proj  # built by the stock encoder because --ctc-weight > 0
    assert any(p is head.weight for p in model.parameters())  # so the optimizer trains it
    task.load_dataset("dev")
    dataset = task.dataset("dev")
    sample = dataset.collater([dataset[i] for i in range(len(dataset))])

    model.train()
    loss, sample_size, log = criterion(model, sample)
    assert sample_size == sample["ntokens"]
    assert loss.item() == pytest.approx(0.7 * log["ce_loss"].item() + 0.3 * log["ctc_loss"].item(), rel=1e-5)
    assert "ctc_words" not in log
    loss.backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0

    model.eval()
    with torch.no_grad():
        _, _, log = criterion(model, sample)
    references = [line.split("\t")[3] for line in (tiny_speech_data / "dev.tsv").read_text().splitlines()[1:]]
    assert log["ctc_words"] == sum(len(r.split()) for r in references)
    assert log["ctc_chars"] == sum(len(r.replace(" ", "")) for r in references)
    assert 0 < log["ctc_word_errors"] and 0 < log["ctc_char_errors"]


def test_criterion_without_ctc_head_or_with_bad_weight(tiny_speech_data):
    task, model, criterion = build_like_fairseq_train(tiny_speech_data, "--ctc-weight", "0")
    assert model.encoder.ctc_proj is None
    task.load_dataset("dev")
    dataset = task.dataset("dev")
    sample = dataset.collater([dataset[0], dataset[1]])
    loss, _, log = criterion(model, sample)
    assert "ctc_loss" not in log and loss.item() == pytest.approx(log["ce_loss"].item())

    criterion.ctc_weight = 0.3  # a model built without the head, trained with CTC
    with pytest.raises(CTCHeadError, match="S2TTransformerModel has no CTC head"):
        criterion(model, sample)
    with pytest.raises(ValueError, match=r"--ctc-weight must be in \[0, 1\].*got 1.5"):
        build_like_fairseq_train(tiny_speech_data, "--ctc-weight", "1.5")


@pytest.fixture(scope="module")
def ctc_training_run(tiny_speech_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """fairseq-train of a tiny stock s2t_transformer with joint_ctc_attention for 3 updates:
    (the finished process, its checkpoint_last.pt)."""
    save_dir = tmp_path_factory.mktemp("ctc_checkpoints")
    train = run_cli([
        "fairseq-train", tiny_speech_data, "--user-dir", USER_DIR, "--task", "speech_to_text",
        "--config-yaml", "config.yaml", "--train-subset", "train", "--valid-subset", "dev", *TINY_S2T,
        "--criterion", "joint_ctc_attention", "--ctc-weight", "0.3", "--optimizer", "adam", "--lr", "1e-3",
        "--max-tokens", "4000", "--max-update", "3", "--cpu", "--num-workers", "0", "--seed", "1",
        "--save-dir", save_dir, "--no-epoch-checkpoints", "--log-format", "simple", "--log-interval", "1",
    ])
    assert train.returncode == 0, cli_output(train)
    return train, save_dir / "checkpoint_last.pt"


def test_fairseq_train_logs_ctc_loss_and_valid_ctc_error_rates(ctc_training_run):
    train, checkpoint = ctc_training_run
    lines = (train.stdout + train.stderr).splitlines()
    train_lines = [line for line in lines if "| train |" in line or "train_inner" in line]
    valid_lines = [line for line in lines if "valid on 'dev' subset" in line]
    assert train_lines and all("ctc_loss" in line and "ctc_wer" not in line for line in train_lines)
    assert valid_lines and all(re.search(r"ctc_wer [\d.]+ \| ctc_cer [\d.]+", line) for line in valid_lines)
    state = checkpoint_utils.load_checkpoint_to_cpu(str(checkpoint))  # the plugin's safe loading, as fairseq's CLIs
    assert {"encoder.ctc_proj.weight", "encoder.ctc_proj.bias"} <= set(state["model"])


def test_fairseq_generate_loads_the_checkpoint_into_the_stock_model(tiny_speech_data, ctc_training_run):
    _, checkpoint = ctc_training_run
    generate = run_cli([
        "fairseq-generate", tiny_speech_data, "--user-dir", USER_DIR, "--task", "speech_to_text",
        "--config-yaml", "config.yaml", "--gen-subset", "test", "--path", checkpoint,
        "--max-tokens", "4000", "--beam", "2", "--max-len-b", "20", "--cpu", "--scoring", "wer",
    ])
    assert generate.returncode == 0, cli_output(generate)
    assert sum(line.startswith("H-") for line in generate.stdout.splitlines()) == SPLITS["test"]


def test_fairseq_generate_ctc_greedy_prints_the_heads_best_paths(tiny_speech_data, ctc_training_run):
    """--accel-generator ctc_greedy through fairseq-generate: one hypothesis per utterance, the CTC head's best
    path (recomputed here from the checkpoint's weights)."""
    _, checkpoint = ctc_training_run
    generate = run_cli([
        "fairseq-generate", tiny_speech_data, "--user-dir", USER_DIR, "--task", "speech_to_text_accel",
        "--config-yaml", "config.yaml", "--gen-subset", "test", "--path", checkpoint,
        "--accel-generator", "ctc_greedy", "--max-tokens", "4000", "--cpu", "--scoring", "wer",
    ])
    assert generate.returncode == 0, cli_output(generate)
    printed = {
        int(fields[0][2:]): fields[2]
        for fields in (line.split("\t") for line in generate.stdout.splitlines() if line.startswith("H-"))
    }
    assert len(printed) == SPLITS["test"]

    task, model, _ = build_like_fairseq_train(tiny_speech_data, "--ctc-weight", "0.3")
    model.load_state_dict(checkpoint_utils.load_checkpoint_to_cpu(str(checkpoint))["model"])
    model.eval()
    task.load_dataset("test")
    dataset = task.dataset("test")
    sample = dataset.collater([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        encoder_out = model.encoder(sample["net_input"]["src_tokens"], sample["net_input"]["src_lengths"])
        paths = ctc_best_paths(*ctc_log_probs(model.encoder.ctc_proj, encoder_out), BLANK)
    expected = {int(i): task.target_dictionary.string(torch.tensor(path.tokens)) for i, path in zip(sample["id"], paths)}
    assert printed == expected


def test_ctc_greedy_refuses_models_without_ctc_head_and_fast_generator_options(tiny_speech_data):
    task, model, _ = build_like_fairseq_train(tiny_speech_data, "--ctc-weight", "0")
    ctc_greedy = AccelGenerationConfig(accel_generator="ctc_greedy")
    with pytest.raises(AccelGenerationError, match="needs a model trained with a CTC loss.*has no CTC head"):
        build_ctc_generator([model], ctc_greedy, task.target_dictionary)
    with pytest.raises(AccelGenerationError, match="--kv-cache-dtype apply to the fast generator"):
        build_ctc_generator([model], AccelGenerationConfig(accel_generator="ctc_greedy", kv_cache_dtype="int8"),
                            task.target_dictionary)
    with pytest.raises(AccelGenerationError, match="one model, got an ensemble of 2"):
        build_ctc_generator([model, model], ctc_greedy, task.target_dictionary)


def test_benchmark_cli_runs_on_a_speech_model(tiny_speech_data, ctc_training_run, tmp_path):
    """fairseq-accel-benchmark on speech_to_text (whose build_generator needs fairseq-generate's DictConfig)."""
    _, checkpoint = ctc_training_run
    rows = tmp_path / "rows.json"
    result = run_cli(["fairseq-accel-benchmark", tiny_speech_data, "--config-yaml", "config.yaml", "--path", checkpoint,
                      "--gen-subset", "test", "--batch-sizes", "2", "--beam", "2", "--max-sentences", "4",
                      "--threads", "1", "--repeats", "1", "--systems", "stock", "fast", "--json", rows])
    assert result.returncode == 0, cli_output(result)
    by_system = {row["system"]: row for row in json.loads(rows.read_text())}
    assert set(by_system) == {"stock", "fast"} and by_system["fast"]["sentences"] == 4
    # utterances/s and the real-time factor against the audio of the 4 utterances (manifest frames, 10 ms apart)
    with open(Path(tiny_speech_data) / "test.tsv") as tsv:
        frames = [int(row["n_frames"]) for row in csv.DictReader(tsv, delimiter="\t")][:4]
    for row in by_system.values():
        assert row["audio_seconds"] == pytest.approx(sum((n - 1) * 0.010 + 0.025 for n in frames))
        assert row["real_time_factor"] == pytest.approx(row["seconds"] / row["audio_seconds"])
        assert row["sentences_per_second"] == pytest.approx(4 / row["seconds"])
    assert "| utterances | tokens | seconds | tokens/s | utterances/s | RTF | x stock | WER |" in result.stdout
