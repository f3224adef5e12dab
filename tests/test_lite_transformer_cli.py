"""Lite Transformer through the real fairseq CLIs, and the offline mini recipe end to end."""
import json
import re
import shutil
from pathlib import Path

import pytest

from conftest import REPO_ROOT, TINY_TRAIN, USER_DIR, cli_output, run_cli, tiny_lsra

TINY_LSRA = tiny_lsra()
TRAIN = TINY_TRAIN


def test_fairseq_train_and_generate_a_lite_transformer(tiny_translation_data, tmp_path):
    """The toy language (mapped words, reversed) is learned well enough to score far above chance."""
    save_dir = tmp_path / "checkpoints"
    train = run_cli(["fairseq-train", tiny_translation_data, "--user-dir", USER_DIR, *TINY_LSRA, *TRAIN,
                     "--max-update", "150", "--save-dir", save_dir])
    assert train.returncode == 0, cli_output(train)
    assert "LiteTransformerModel" in train.stdout + train.stderr
    generate = run_cli(["fairseq-generate", tiny_translation_data, "--user-dir", USER_DIR,
                        "--path", save_dir / "checkpoint_last.pt", "--beam", "5", "--batch-size", "16",
                        "--cpu"])
    assert generate.returncode == 0, cli_output(generate)
    hypotheses = [line for line in generate.stdout.splitlines() if line.startswith("H-")]
    assert len(hypotheses) == 40
    bleu = float(re.search(r"BLEU4 = ([\d.]+)", generate.stdout).group(1))
    assert bleu > 10.0, generate.stdout[-2000:]  # an untrained model scores below 1


def test_checkpoint_arch_flags_are_validated_at_train_time(tiny_translation_data, tmp_path):
    bad = [*TINY_LSRA, "--decoder-branch-type", "attn:1:16:2", "lightweight:default:8:2"]
    train = run_cli(["fairseq-train", tiny_translation_data, "--user-dir", USER_DIR, *bad, *TRAIN,
                     "--max-update", "1", "--save-dir", tmp_path])
    assert train.returncode != 0
    last_line = train.stderr.strip().splitlines()[-1]
    assert "--decoder-branch-type: branch dims 16+8=24 do not sum to --decoder-embed-dim 32" in last_line


@pytest.mark.skipif(not list(Path("/usr/share/locale/de/LC_MESSAGES").glob("*.mo")),
                    reason="no German gettext catalogs in /usr/share/locale/de/LC_MESSAGES: make system-deps")
def test_mini_recipe_end_to_end(tmp_path):
    """Every stage of egs/mini_l10n/nmt/run.sh on the real catalogs, with a tiny training budget."""
    recipe = REPO_ROOT / "egs" / "mini_l10n" / "nmt" / "run.sh"
    command = [
        "bash", recipe, "--data_dir", tmp_path / "data", "--exp_dir", tmp_path / "exp", "--bpe_vocab_size", "2000",
        "--train_args", "--max-update 2 --max-tokens 2048", "--gen_subset", "valid",
        "--decode_args", "--beam 2 --max-len-a 0 --max-len-b 6 --batch-size 128",
        "--bench_sentences", "8", "--bench_args", "--threads 1 --repeats 1 --max-len-b 6 --systems stock fast fast-w8a8-kv8 ct2-int8",
    ]
    result = run_cli(command, timeout=900)
    assert result.returncode == 0, cli_output(result)[-5000:]
    for name in ("train", "valid", "test"):
        assert (tmp_path / "data" / "text" / f"{name}.de").is_file()
    results = json.loads((tmp_path / "exp" / "RESULTS.json").read_text())
    assert [row["experiment"] for row in results] == ["lite_transformer_mini", "transformer_mini"]
    assert [row["arch"] for row in results] == ["lite_transformer_mini", "transformer"]
    valid_size = len((tmp_path / "data" / "text" / "valid.en").read_text().splitlines())
    assert [row["sentences"] for row in results] == [valid_size, valid_size]
    # matched Mult-Adds: the baseline is within 5% of the LSRA model (fairseq-accel-profile)
    lsra, baseline = (row["mult_adds"] for row in results)
    assert abs(lsra - baseline) / lsra < 0.05
    assert "| lite_transformer_mini | lite_transformer_mini |" in result.stdout
    bench = json.loads((tmp_path / "exp" / "transformer_mini" / "benchmark.json").read_text())  # stage 7
    systems = ("stock", "fast", "fast-w8a8-kv8", "ct2-int8")  # fast-w8a8-kv8: the calibrated int8 copy's layers
    assert [(row["system"], row["batch"]) for row in bench] == [(s, b) for b in (1, 32) for s in systems]
    assert (tmp_path / "exp" / "transformer_mini" / "int8" / "compressed.pt").is_file()
    assert all(row["sentences"] == 8 for row in bench)
    rerun = run_cli(command, timeout=600)
    assert rerun.returncode == 0, cli_output(rerun)[-3000:]
    assert rerun.stderr.count("already done") == 8  # stages 1, 2, 3, train + decode of both configs, benchmark
