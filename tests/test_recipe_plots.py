"""The recipes' plots in egs/tools: plot_training.py (loss against update from fairseq-train logs) and
plot_frontier.py (score against decoded tokens/s from fairseq-accel-benchmark --json)."""
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "egs" / "tools"
sys.path.insert(0, str(TOOLS))

from plot_frontier import benchmark_name, frontier_points, read_rows  # noqa: E402
from plot_training import read_curves  # noqa: E402
from results_table import ResultsError  # noqa: E402

# Lines as fairseq-train --log-format simple writes them (from the mini recipes' logs), around other lines.
NMT_LOG = """\
2026-11-29 22:25:01 | INFO | fairseq_cli.train | model lite_transformer_mini, criterion LabelSmoothedCrossEntropyCriterion
2026-11-29 22:28:22 | INFO | train_inner | epoch 001:     50 / 147 loss=11.439, nll_loss=11.17, ppl=2304.5, wps=741.6, ups=0.25, wpb=2886.5, bsz=255.4, num_updates=50, lr=0.000500067, gnorm=2.004, train_wall=198, wall=202
2026-11-29 22:31:07 | INFO | train_inner | epoch 001:    100 / 147 loss=9.669, nll_loss=9.09, ppl=545.14, wps=934.5, ups=0.3, wpb=3081.7, bsz=260.5, num_updates=100, lr=0.00100003, gnorm=1.619, train_wall=165, wall=367
2026-11-29 22:33:50 | INFO | valid | epoch 001 | valid on 'valid' subset | loss 8.525 | nll_loss 7.768 | ppl 217.91 | wps 2816.2 | wpb 1671.1 | bsz 141 | num_updates 147
2026-11-29 22:33:50 | INFO | train | epoch 001 | loss 10.036 | nll_loss 9.527 | ppl 737.56 | wps 840.3 | ups 0.28 | wpb 2987.4 | bsz 250.7 | num_updates 147 | lr 0.00147 | gnorm 1.677 | train_wall 521 | wall 530
2026-11-29 22:36:40 | INFO | train_inner | epoch 002:     53 / 147 loss=7.942, nll_loss=7.1, ppl=137.2, wps=900.1, ups=0.3, wpb=2990.2, bsz=250.1, num_updates=200, lr=0.00141421, gnorm=1.4, train_wall=160, wall=700
2026-11-29 22:41:53 | INFO | valid | epoch 002 | valid on 'valid' subset | loss 6.406 | nll_loss 5.319 | ppl 39.91 | wps 2287.3 | wpb 1671.1 | bsz 141 | num_updates 294 | best_loss 6.406
"""
ASR_LOG = """\
2026-11-29 22:28:08 | INFO | train_inner | epoch 001:     50 / 261 loss=4.26, nll_loss=3.855, ce_loss=4.101, ctc_loss=4.63, ppl=14.47, wps=1344.3, ups=1.1, wpb=1218.2, bsz=29.9, num_updates=50, lr=0.00100007, gnorm=1.621, clip=0, train_wall=45, wall=48
2026-11-29 22:31:26 | INFO | dev | epoch 001 | valid on 'dev' subset | loss 2.507 | nll_loss 2.285 | ce_loss 2.798 | ctc_loss 1.827 | ppl 4.87 | ctc_wer 99.307 | ctc_cer 34.839 | wps 1762.9 | wpb 809.4 | bsz 21.4 | num_updates 261
2026-11-29 22:33:00 | INFO | train_inner | epoch 002:     39 / 261 loss=2.62, nll_loss=2.1, ce_loss=2.7, ctc_loss=2.4, ppl=4.29, wps=1300.0, ups=1.1, wpb=1210.0, bsz=30.1, num_updates=300, lr=0.0019, gnorm=0.9, clip=0, train_wall=40, wall=300
2026-11-29 22:35:04 | INFO | dev | epoch 002 | valid on 'dev' subset | loss 1.744 | nll_loss 1.189 | ce_loss 1.896 | ctc_loss 1.389 | ppl 2.28 | ctc_wer 89.607 | ctc_cer 27.613 | wps 3495.8 | wpb 809.4 | bsz 21.4 | num_updates 500 | best_loss 1.744
"""


def write_exp(root: Path, name: str, log: str) -> Path:
    exp = root / name
    exp.mkdir(parents=True)
    (exp / "train.log").write_text(log, encoding="utf-8")
    return exp


def run_tool(script: str, *args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOLS / script), *map(str, args)], capture_output=True, text=True)


def assert_png(path: Path) -> None:
    from matplotlib import image

    pixels = image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100


def assert_one_line_error(result: subprocess.CompletedProcess, script: str, names: Path) -> None:
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"{script}: error: ")
    assert str(names) in result.stderr


# --------------------------------------------------------------------------------------------------
# plot_training.py
# --------------------------------------------------------------------------------------------------
def test_read_curves_of_an_nmt_log(tmp_path):
    """train_inner losses and the 'valid' subset's losses by update; nll_loss, best_loss and the epoch
    summary ("| train |") are not taken."""
    curves = read_curves(write_exp(tmp_path, "nmt", NMT_LOG) / "train.log")
    assert curves == {"train": ([50, 100, 200], [11.439, 9.669, 7.942]), "valid": ([147, 294], [8.525, 6.406])}


def test_read_curves_of_an_asr_log(tmp_path):
    """The speech recipes validate on 'dev'; ce_loss and ctc_loss are not the loss."""
    curves = read_curves(write_exp(tmp_path, "asr", ASR_LOG) / "train.log")
    assert curves == {"train": ([50, 300], [4.26, 2.62]), "valid": ([261, 500], [2.507, 1.744])}


def test_read_curves_of_a_resumed_training_keeps_the_later_values(tmp_path):
    """A training resumed from checkpoint_last.pt logs some updates again: one point each, the later value."""
    resumed = NMT_LOG + NMT_LOG.replace("loss=9.669", "loss=9.5").replace("loss 8.525", "loss 8.4")
    curves = read_curves(write_exp(tmp_path, "nmt", resumed) / "train.log")
    assert curves == {"train": ([50, 100, 200], [11.439, 9.5, 7.942]), "valid": ([147, 294], [8.4, 6.406])}


def test_read_curves_errors_name_the_file(tmp_path):
    with pytest.raises(ResultsError, match="missing/train.log not found; run the training stage"):
        read_curves(tmp_path / "missing" / "train.log")
    empty = write_exp(tmp_path, "empty", "2026-11-29 22:25:01 | INFO | fairseq_cli.train | start\n") / "train.log"
    with pytest.raises(ResultsError, match=re.escape(f"{empty}: no train_inner or 'valid on' loss line")):
        read_curves(empty)


def test_plot_training_cli_writes_one_png_for_several_experiments(tmp_path):
    nmt, asr = write_exp(tmp_path, "nmt", NMT_LOG), write_exp(tmp_path, "asr", ASR_LOG)
    out = tmp_path / "plots" / "training_curves.png"
    result = run_tool("plot_training.py", nmt, asr, "--out", out, "--title", "mini")
    assert result.returncode == 0, result.stderr
    assert_png(out)


def test_plot_training_cli_errors_are_one_line_naming_the_log(tmp_path):
    good = write_exp(tmp_path, "good", NMT_LOG)
    missing = run_tool("plot_training.py", good, tmp_path / "missing", "--out", tmp_path / "x.png")
    assert_one_line_error(missing, "plot_training.py", tmp_path / "missing" / "train.log")
    no_loss = write_exp(tmp_path, "no_loss", "fairseq-train: error: unrecognized arguments: --bad\n")
    result = run_tool("plot_training.py", no_loss, "--out", tmp_path / "x.png")
    assert_one_line_error(result, "plot_training.py", no_loss / "train.log")
    assert not (tmp_path / "x.png").exists()


# --------------------------------------------------------------------------------------------------
# plot_frontier.py
# --------------------------------------------------------------------------------------------------
def benchmark_row(system: str, batch: int, seconds: float, score: float, score_name: str = "BLEU") -> Dict[str, object]:
    """One row as ``fairseq-accel-benchmark --json`` writes it (benchmarking.Row plus tokens_per_second)."""
    fast = system.startswith("fast")
    return {"system": system, "threads": 2, "batch": batch, "beam": 5, "sentences": 100, "tokens": 1000,
            "seconds": seconds, "score_name": score_name, "score": score,
            "self_kv_bytes": 48720 if fast else None, "cross_kv_bytes": 68949 if fast else None,
            "ratio": float("nan"), "tokens_per_second": 1000 / seconds}


BENCHMARK = [
    benchmark_row("stock", 1, 10.0, 20.5), benchmark_row("fast", 1, 5.0, 20.5),
    benchmark_row("fast-int8", 1, 4.0, 20.1), benchmark_row("ct2-int8", 1, 2.0, 19.8),
    benchmark_row("stock", 32, 2.0, 20.5), benchmark_row("fast", 32, 1.0, 20.5),
]


def write_benchmark(path: Path, rows: List[Dict[str, object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1), encoding="utf-8")  # NaN as the benchmark writes it
    return path


def test_frontier_points_group_by_batch_slowest_first(tmp_path):
    rows = read_rows(write_benchmark(tmp_path / "benchmark.json", list(reversed(BENCHMARK))))
    assert frontier_points(rows) == {
        1: [("stock", 100.0, 20.5), ("fast", 200.0, 20.5), ("fast-int8", 250.0, 20.1), ("ct2-int8", 500.0, 19.8)],
        32: [("stock", 500.0, 20.5), ("fast", 1000.0, 20.5)],
    }


def test_benchmark_name_is_the_experiment():
    assert benchmark_name(Path("exp/transformer_mini/benchmark.json")) == "transformer_mini"
    assert benchmark_name(Path("runs/lite_int8.json")) == "lite_int8"


def test_read_rows_errors_name_the_file(tmp_path):
    with pytest.raises(ResultsError, match="nope.json not found; run the decoding benchmark"):
        read_rows(tmp_path / "nope.json")
    cut = tmp_path / "cut.json"
    cut.write_text('[{"system": "stock",', encoding="utf-8")
    with pytest.raises(ResultsError, match=re.escape(f"{cut}: not JSON")):
        read_rows(cut)
    other = write_benchmark(tmp_path / "other.json", [{"system": "stock", "batch": 1}])
    with pytest.raises(ResultsError, match=re.escape(f"{other}: a row lacks score_name, score, tokens_per_second")):
        read_rows(other)
    mixed = write_benchmark(tmp_path / "mixed.json", [BENCHMARK[0], benchmark_row("fast", 1, 5.0, 30.0, "WER")])
    with pytest.raises(ResultsError, match=re.escape(f"{mixed}: rows scored with BLEU and WER")):
        read_rows(mixed)


def test_plot_frontier_cli_writes_a_png_for_bleu_and_wer(tmp_path):
    nmt = write_benchmark(tmp_path / "transformer_mini" / "benchmark.json", BENCHMARK)
    wer_rows = [benchmark_row("stock", 1, 3.0, 31.1, "WER"), benchmark_row("fast-int8", 1, 1.5, 31.4, "WER")]
    asr = write_benchmark(tmp_path / "s2t" / "benchmark.json", wer_rows)
    for benchmark in (nmt, asr):
        out = benchmark.parent / "frontier.png"
        result = run_tool("plot_frontier.py", benchmark, "--out", out)
        assert result.returncode == 0, result.stderr
        assert_png(out)


def test_plot_frontier_cli_errors_are_one_line_naming_the_file(tmp_path):
    nmt = write_benchmark(tmp_path / "a" / "benchmark.json", BENCHMARK)
    missing = run_tool("plot_frontier.py", nmt, tmp_path / "b" / "benchmark.json", "--out", tmp_path / "x.png")
    assert_one_line_error(missing, "plot_frontier.py", tmp_path / "b" / "benchmark.json")
    asr = write_benchmark(tmp_path / "c" / "benchmark.json", [benchmark_row("stock", 1, 3.0, 31.1, "WER")])
    mixed = run_tool("plot_frontier.py", nmt, asr, "--out", tmp_path / "x.png")
    assert mixed.returncode == 2 and "scored with BLEU and WER; one score per plot" in mixed.stderr
    assert not (tmp_path / "x.png").exists()
