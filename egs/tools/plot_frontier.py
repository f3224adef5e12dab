#!/usr/bin/env python3
"""The speed/accuracy frontier of a decoding benchmark: BLEU (or WER for speech: the score the benchmark
holds) against decoded tokens per second, one point per system (stock, fast, fast-int8, ct2-float32,
ct2-int8, ...) labelled with its name, one dotted line (its own colour and marker) per batch size of each
benchmark file. Reads the rows that ``fairseq-accel-benchmark ... --json FILE`` writes (fairseq_accel/benchmarking.py);
stage 7 of egs/mini_l10n/nmt/run.sh draws exp/<config>/frontier.png from exp/<config>/benchmark.json:

    python egs/tools/plot_frontier.py exp/transformer_mini/benchmark.json --out exp/transformer_mini/frontier.png
"""
import argparse
import itertools
import json
import math
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from plot_training import agg_pyplot, save_figure
from results_table import ResultsError

#: Keys of a benchmark row that the plot needs.
ROW_KEYS = ("system", "batch", "score_name", "score", "tokens_per_second")
MARKERS = "osD^v<>ph*"
#: (system, tokens/s, score) of one benchmarked system.
Point = Tuple[str, float, float]


def read_rows(path: Path) -> List[Dict[str, Any]]:
    """The rows of one benchmark JSON, checked to hold what the plot needs and one score name."""
    if not path.is_file():
        raise ResultsError(f"{path} not found; run the decoding benchmark (fairseq-accel-benchmark --json) first")
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ResultsError(f"{path}: not JSON ({error}); was the benchmark cut short?") from None
    if not isinstance(rows, list) or not rows:
        raise ResultsError(f"{path}: expected a non-empty list of rows, as fairseq-accel-benchmark --json writes")
    for row in rows:
        missing = [key for key in ROW_KEYS if not isinstance(row, dict) or key not in row]
        if missing:
            raise ResultsError(f"{path}: a row lacks {', '.join(missing)}; "
                               f"is it a fairseq-accel-benchmark --json file?")
    names = sorted({row["score_name"] for row in rows})
    if len(names) > 1:
        raise ResultsError(f"{path}: rows scored with {' and '.join(names)}; one score per plot")
    return rows


def frontier_points(rows: Sequence[Dict[str, Any]]) -> Dict[int, List[Point]]:
    """Batch size -> its systems' (system, tokens/s, score), slowest first: the points of one line."""
    points: Dict[int, List[Point]] = {}
    for row in rows:
        points.setdefault(int(row["batch"]), []).append(
            (str(row["system"]), float(row["tokens_per_second"]), float(row["score"])))
    return {batch: sorted(line, key=lambda point: point[1]) for batch, line in sorted(points.items())}


def benchmark_name(path: Path) -> str:
    """The experiment a benchmark file belongs to: its folder (exp/<config>/benchmark.json), else its stem."""
    return path.parent.name if path.name == "benchmark.json" and path.parent.name else path.stem


def minor_tick_label(value: float, _position: int) -> str:
    """Plain numbers at 2x and 5x a power of ten on the log speed axis, no label elsewhere."""
    mantissa = value / 10 ** math.floor(math.log10(value))
    return f"{value:g}" if round(mantissa) in (2, 5) else ""


def draw_lines(axes, name: str, rows: List[Dict[str, Any]], colours: Iterator[str], several: bool) -> None:
    """One dotted line per batch size of one benchmark, its points labelled with their systems."""
    for line, (batch, points) in enumerate(frontier_points(rows).items()):
        _, speeds, scores = zip(*points)
        axes.plot(speeds, scores, color=next(colours), linestyle=":", marker=MARKERS[line % len(MARKERS)],
                  label=f"{name}, batch {batch}" if several else f"batch {batch}")
        for order, (system, speed, score) in enumerate(points):  # above/below in turn: close points stay legible
            axes.annotate(system, (speed, score), textcoords="offset points", fontsize="x-small",
                          xytext=(4, 5 if order % 2 == 0 else -11))


def label_axes(axes, score_name: str) -> None:
    """Log speed axis with plain numbers; the score axis says which way is better."""
    from matplotlib.ticker import FuncFormatter

    better = "lower" if score_name.upper() in ("WER", "CER") else "higher"
    axes.set_xscale("log")
    axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axes.xaxis.set_minor_formatter(FuncFormatter(minor_tick_label))
    axes.set_xlabel("decoded tokens/s (log scale)")
    axes.set_ylabel(f"{score_name}{' %' if better == 'lower' else ''} ({better} is better)")
    axes.grid(alpha=0.3, which="both")


def plot_frontier(benchmarks: Dict[str, List[Dict[str, Any]]], out: Path, title: Optional[str] = None) -> None:
    """Score against tokens/s of every system of ``benchmarks`` (name -> :func:`read_rows`), one figure."""
    score_names = sorted({row["score_name"] for rows in benchmarks.values() for row in rows})
    if len(score_names) > 1:
        raise ResultsError(f"the benchmarks are scored with {' and '.join(score_names)}; one score per plot")
    pyplot = agg_pyplot()
    figure, axes = pyplot.subplots(figsize=(7, 4.5))
    colours = itertools.cycle(pyplot.rcParams["axes.prop_cycle"].by_key()["color"])
    for name, rows in benchmarks.items():
        draw_lines(axes, name, rows, colours, several=len(benchmarks) > 1)
    label_axes(axes, score_names[0])
    axes.set_title(title or f"{score_names[0]} against decoding speed: {', '.join(benchmarks)}")
    axes.legend(fontsize="small")
    save_figure(figure, out)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmarks", nargs="+", type=Path, help="fairseq-accel-benchmark --json files")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--title", help="title of the figure (default: the score and the benchmarks' names)")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        plot_frontier({benchmark_name(path): read_rows(path) for path in args.benchmarks}, args.out, args.title)
    except ResultsError as error:
        print(f"plot_frontier.py: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
