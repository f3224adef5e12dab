"""The recipes' compression stages (egs/tools/compress_stages.sh): fine-tunes of a trained experiment with
conf/compress/*.yaml added to the results table, and the accuracy-vs-sparsity sweep (egs/tools/sparsity_sweep.py)."""
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
import torch
import yaml
from fairseq import checkpoint_utils, options

import fairseq_accel.plugin  # noqa: F401  (registers the tasks and models; safe checkpoint loading)
from conftest import REPO_ROOT, USER_DIR, cli_output, run_cli, write_toy_corpus
from fairseq_accel.compression.config import check_compression_options

TOOLS = REPO_ROOT / "egs" / "tools"
NMT_RECIPE = REPO_ROOT / "egs" / "mini_l10n" / "nmt"
COMPRESS_CONFIGS = sorted(REPO_ROOT.glob("egs/*/*/conf/compress/*.yaml"))
#: A fine-tune budget the test can afford, laid over the shipped configs (everything else kept).
TINY_BUDGET = {"max_update": 6, "warmup_updates": 2, "sparsity_end_update": 4, "sparsity_frequency": 2}


def tiny_variant(config: Path, folder: Path) -> Path:
    """``config`` (a shipped conf/compress/*.yaml) with the test's budget, same file name, in ``folder``."""
    loaded = yaml.safe_load(config.read_text(encoding="utf-8"))
    loaded["train"].update({key: value for key, value in TINY_BUDGET.items()
                            if key in loaded["train"] or not key.startswith("sparsity")})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / config.name).write_text(yaml.safe_dump(loaded, sort_keys=False), encoding="utf-8")
    return folder / config.name


def binarized_toy_corpus(data_dir: Path, vocab: str) -> None:
    """What stages 1-3 of the mini NMT recipe leave (text, binarized data, .done markers), made from the toy
    corpus under the recipe's language names, so the test starts at the training stage."""
    text = data_dir / "text"
    toy = write_toy_corpus(data_dir / "toy")
    text.mkdir(parents=True)
    for split in ("train", "valid", "test"):
        for suffix, lang in (("src", "de"), ("tgt", "en")):
            (text / f"{split}.{lang}").write_text((toy / f"{split}.{suffix}").read_text())
    binarized = data_dir / f"bin_{vocab}"
    result = run_cli(["fairseq-preprocess", "--source-lang", "de", "--target-lang", "en", "--joined-dictionary",
                      "--trainpref", text / "train", "--validpref", text / "valid", "--testpref", text / "test",
                      "--destdir", binarized, "--workers", "1"])
    assert result.returncode == 0, cli_output(result)
    for marker in (text / ".done", binarized / ".done"):
        marker.touch()


def table_rows(markdown: str) -> Dict[str, List[str]]:
    """The body rows of the first markdown table in ``markdown``, by their first cell."""
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    return {cells[0]: cells for cells in (line.strip("| ").split(" | ") for line in lines[1:])}


def pruned_weight_zeros(checkpoint: Path) -> Dict[str, float]:
    """Share of zeros of every weight in the default compression scope (each nn.Linear but the output
    projection), found on the model rebuilt from ``checkpoint``, independently of the saved masks."""
    models, _ = checkpoint_utils.load_model_ensemble([str(checkpoint)])
    return {f"{name}.weight": float((module.weight == 0).float().mean())
            for name, module in models[0].named_modules()
            if isinstance(module, torch.nn.Linear) and not name.endswith("output_projection")}


def test_mini_nmt_recipe_compress_and_sweep_stages(tmp_path):
    """Stages 4-10 of egs/mini_l10n/nmt/run.sh (stages 1-3 and 7 have their own end-to-end test) on a toy
    corpus: the trained LSRA model, its 50 % fine-tune (shipped sparse50.yaml at a tiny budget) in RESULTS.md
    with the sparsity reached, a 2-point sweep with table, raw json and plot, both models compressed after
    training and decoded in int8 (COMPRESSION.md, its json and plot); a rerun finds every step done."""
    data, exp, conf = tmp_path / "data", tmp_path / "exp", tmp_path / "conf"
    binarized_toy_corpus(data, "unigram8000")
    sparse50 = tiny_variant(NMT_RECIPE / "conf" / "compress" / "sparse50.yaml", conf)
    command = [
        "bash", NMT_RECIPE / "run.sh", "--stage", "4", "--stop_stage", "10", "--data_dir", data, "--exp_dir", exp,
        "--configs", "conf/lite_transformer_mini.yaml", "--train_args", "--max-update 2 --max-tokens 1024",
        "--gen_subset", "valid", "--decode_args", "--beam 2 --max-len-a 0 --max-len-b 6 --batch-size 128",
        "--compress_configs", sparse50, "--compress_args", "--max-tokens 1024",
        "--sweep_config", sparse50, "--sweep_sparsities", "0 50", "--sweep_patterns", "2:4",
        "--bench_configs", "",  # stage 7 (decoding speed) has its own test
        "--quantize_args", "--calib-batches 4 --max-tokens 1024",
    ]
    result = run_cli(command, timeout=600)
    assert result.returncode == 0, cli_output(result)[-5000:]

    rows = json.loads((exp / "RESULTS.json").read_text())
    assert [row["experiment"] for row in rows] == ["lite_transformer_mini", "lite_transformer_mini__sparse50"]
    assert rows[0]["sparsity"] is None and rows[1]["sparsity"] == pytest.approx(0.5, abs=0.005)
    table = table_rows((exp / "RESULTS.md").read_text())
    assert table["lite_transformer_mini"][6] == "-" and table["lite_transformer_mini__sparse50"][6] == "50.0"
    fine_tune = exp / "lite_transformer_mini__sparse50"
    train_args = (fine_tune / "train.args").read_text().split("\n")
    assert train_args[train_args.index("--sparsity-target") + 1] == "0.5"
    assert train_args[train_args.index("--arch") + 1] == "lite_transformer_mini"  # the base config's section below
    zeros = pruned_weight_zeros(fine_tune / "checkpoints" / "checkpoint_last.pt")
    assert len(zeros) >= 12 and all(abs(share - 0.5) <= 0.005 for share in zeros.values()), zeros

    sweep = json.loads((exp / "lite_transformer_mini" / "sparsity_sweep.json").read_text())
    assert [(row["point"], row["pattern"], row["target"]) for row in sweep] == [
        ("dense_0", "dense", 0.0), ("2of4_50", "2:4", 50.0)]
    assert sweep[0]["reached"] == 0.0 and all(row["reached"] == pytest.approx(50, abs=0.5) for row in sweep[1:])
    sweep_results = exp / "lite_transformer_mini" / "sweep" / "RESULTS.json"
    scored = {row["experiment"]: row for row in json.loads(sweep_results.read_text())}
    assert all(row["bleu"] == scored[row["point"]]["bleu"] for row in sweep)
    assert sweep[0]["delta"] == 0 and sweep[1]["delta"] == pytest.approx(sweep[1]["bleu"] - sweep[0]["bleu"])
    dense_args = (exp / "lite_transformer_mini" / "sweep" / "dense_0" / "train.args").read_text()
    assert "--max-update\n6\n" in dense_args and "--sparsity" not in dense_args  # same budget, no pruning
    markdown = (exp / "lite_transformer_mini" / "sparsity_sweep.md").read_text()
    assert set(table_rows(markdown)) == {"dense_0", "2of4_50"}
    assert "--sweep_patterns 2:4" in markdown  # the command
    png = (exp / "lite_transformer_mini" / "sparsity_sweep.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000

    compressed = json.loads((exp / "COMPRESSION.json").read_text())
    assert [row["model"] for row in compressed] == ["lite_transformer_mini", "lite_transformer_mini__sparse50"]
    dense, sparse = compressed
    assert 3.5 < dense["ratio"] < 4.0  # int8 levels + per-row scales, float biases and norms
    assert sparse["ratio"] > dense["ratio"] and sparse["sparsity"] == pytest.approx(0.5, abs=0.005)
    for row in compressed:
        int8_exp = exp / f"{row['model']}__int8"
        assert re.search(r"activations: \d+ linear layers calibrated \(mse, [1-4] batches of valid\)",
                         (int8_exp / "compress.log").read_text())
        assert "--compressed-exec" not in (int8_exp / "decode_valid" / "generate.args").read_text()  # int8: default
        assert row["after"] == pytest.approx(scored_bleu(exp / "compression" / "RESULTS.json", int8_exp.name))
    assert set(table_rows((exp / "COMPRESSION.md").read_text())) == {row["model"] for row in compressed}
    assert (exp / "compression.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")

    rerun = run_cli(command, timeout=600)
    assert rerun.returncode == 0, cli_output(rerun)[-3000:]
    # base, sparse50, 2 sweep points: train + decode; both compressed: compress + decode
    assert rerun.stderr.count("already done") == 2 + 2 + 2 * 2 + 2 * 2


def scored_bleu(results: Path, experiment: str) -> float:
    return next(row["bleu"] for row in json.loads(results.read_text()) if row["experiment"] == experiment)


@pytest.mark.parametrize("config", COMPRESS_CONFIGS, ids=lambda path: "/".join(path.parts[-5:]))
def test_shipped_compress_configs_are_valid_fine_tunes(config):
    """Every conf/compress/*.yaml, laid over its recipe's first config, gives fairseq-train arguments that
    the recipe's accel task accepts (the plugin's own option checks), pruning before the end of the budget."""
    recipe = config.parent.parent.parent
    base = sorted((recipe / "conf").glob("*.yaml"))[0]
    result = subprocess.run([sys.executable, str(TOOLS / "yaml2args.py"), str(base), "--section", "train",
                             "--override", str(config)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    task = "translation_accel" if recipe.name == "nmt" else "speech_to_text_accel"
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(
        parser, ["data", "--user-dir", str(USER_DIR), "--task", task, *result.stdout.splitlines()])
    check_compression_options(args)
    end = max(args.sparsity_end_update, args.admm_finalize_update)
    assert 0 < end < args.max_update
    assert 0 <= args.sparsity_target < 1 and (args.admm_bits in (0, 4, 8))
    assert (args.sparsity_target > 0) == config.stem.startswith("sparse")
    if args.sparsity_target > 0:  # the name says the sparsity: sparse50, sparse_row50, sparse_2of4 (50 %)
        assert f"{round(100 * args.sparsity_target)}" in config.stem or "2of4" in config.stem
    assert (args.admm_bits > 0) == (f"admm{args.admm_bits}" in config.stem)
    sections = yaml.safe_load(config.read_text(encoding="utf-8"))
    if "compress" in sections:  # stage 10's fairseq-accel-compress options: int4 only on a 4-bit ADMM grid
        compress = subprocess.run([sys.executable, str(TOOLS / "yaml2args.py"), str(config), "--section", "compress"],
                                  capture_output=True, text=True)
        assert compress.returncode == 0 and ("--int4" in compress.stdout.split()) == (args.admm_bits == 4)


def test_asr_recipe_compress_stage_wiring(tmp_path):
    """egs/mini_espeak/asr/run.sh stage 6 runs the shared stage on its --compress_base: without a trained
    base it stops naming that base's checkpoint, before any data or fairseq is touched."""
    result = run_cli(["bash", REPO_ROOT / "egs" / "mini_espeak" / "asr" / "run.sh", "--stage", "6", "--stop_stage", "6",
                      "--data_dir", tmp_path / "data", "--exp_dir", tmp_path / "exp",
                      "--compress_configs", "conf/compress/sparse_2of4.yaml"])
    assert result.returncode == 2, cli_output(result)
    last = result.stderr.strip().splitlines()[-1]
    assert re.search(rf"error: {re.escape(str(tmp_path / 'exp' / 's2t_sanm_mini' / 'checkpoints'))}/checkpoint_best\.pt "
                     r"not found; train conf/s2t_sanm_mini\.yaml first", last), last
    assert "fine-tune s2t_sanm_mini__sparse_2of4 from" in result.stderr
    quantize = run_cli(["bash", REPO_ROOT / "egs" / "mini_espeak" / "asr" / "run.sh", "--stage", "8", "--stop_stage", "8",
                        "--data_dir", tmp_path / "data", "--exp_dir", tmp_path / "exp"])
    assert quantize.returncode == 2, cli_output(quantize)
    assert quantize.stderr.strip().splitlines()[-1].endswith(
        f"error: {tmp_path / 'exp' / 's2t_sanm_mini' / 'checkpoints' / 'checkpoint_best.pt'} not found; run the "
        "training stage for s2t_sanm_mini first"), quantize.stderr
    bad = run_cli(["bash", REPO_ROOT / "egs" / "mini_espeak" / "asr" / "run.sh", "--stage", "7", "--stop_stage", "7",
                   "--exp_dir", tmp_path / "exp", "--sweep_config", "conf/compress/nope.yaml"])
    assert bad.returncode == 2 and "compression config 'conf/compress/nope.yaml' not found" in bad.stderr, cli_output(bad)


def test_yaml2args_override_replaces_in_place_and_appends(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("train:\n  arch: x\n  max-update: 400\n  share_all_embeddings: true\n  lr: 0.1\n")
    override = tmp_path / "over.yaml"
    override.write_text("train:\n  max_update: 20\n  share_all_embeddings: false\n  sparsity_target: 0.5\n")
    result = subprocess.run([sys.executable, str(TOOLS / "yaml2args.py"), str(base), "--section", "train",
                             "--override", str(override)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:-1] == ["--arch", "x", "--max-update", "20", "--lr", "0.1",
                                              "--sparsity-target", "0.5"]
    override.write_text("train:\n  bad key: 1\n")
    result = subprocess.run([sys.executable, str(TOOLS / "yaml2args.py"), str(base), "--section", "train",
                             "--override", str(override)], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith(f"yaml2args.py: error: {override}: key 'train.bad key'")


def test_sparsity_sweep_points_and_errors(tmp_path):
    """Point configs: the template's budget with target and pattern per point, the dense point without any
    sparsity option; bad sparsities and patterns are one error line."""
    template = tiny_variant(NMT_RECIPE / "conf" / "compress" / "sparse50.yaml", tmp_path)
    sweep = [sys.executable, str(TOOLS / "sparsity_sweep.py"), "points", "--template", str(template),
             "--out-dir", str(tmp_path / "points")]
    result = subprocess.run([*sweep, "--sparsities", "0", "70", "90", "--patterns", "row", "1:4"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["dense_0", "row_70", "row_90", "1of4_75"]
    points = {path.stem: yaml.safe_load(path.read_text())["train"] for path in (tmp_path / "points").glob("*.yaml")}
    assert points["row_90"]["sparsity_target"] == 0.9 and points["row_90"]["sparsity_pattern"] == "row"
    assert points["1of4_75"]["sparsity_target"] == 0.75 and points["1of4_75"]["sparsity_pattern"] == "1:4"
    assert points["row_70"]["sparsity_end_update"] == 4 and points["row_70"]["lr"] == points["dense_0"]["lr"]
    assert not any(key.startswith("sparsity") for key in points["dense_0"]) and points["dense_0"]["max_update"] == 6
    for args, message in ((["--sparsities", "100", "--patterns", "row"], "--sparsities: 100 is not a percentage"),
                          (["--sparsities", "50", "--patterns", "blocks"], "--patterns: unknown pattern 'blocks'")):
        result = subprocess.run([*sweep, *args], capture_output=True, text=True)
        assert result.returncode == 2 and result.stderr.startswith(f"sparsity_sweep.py: error: {message}"), result.stderr
    help_text = subprocess.run([sys.executable, str(TOOLS / "sparsity_sweep.py"), "--help"], capture_output=True,
                               text=True).stdout
    assert "sparsity 0 runs the same" in help_text and "points" in help_text and "table" in help_text
