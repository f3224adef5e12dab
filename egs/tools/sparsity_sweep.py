#!/usr/bin/env python3
"""The accuracy-vs-sparsity sweep of the recipes (egs/tools/compress_stages.sh, sweep_stage).

Every point fine-tunes the same trained model with the same budget and schedule (a compression config,
the *template*), only its target sparsity and pattern differ; the point at sparsity 0 runs the same
fine-tune without any pruning option, so the curve isolates the cost of pruning from that of the extra
training. Two steps:

  points  write one compression config per point into --out-dir (<point>.yaml) and print the point
          names, one per line: dense_0, <pattern>_<percent> (e.g. unstructured_70, row_90), and for an
          N:M pattern the one sparsity it reaches, 1 - N/M (2:4 -> 2of4_50)
  table   read the results of the decoded points (the RESULTS.json that nmt_results.py / asr_results.py
          write, one row per point directory, each holding its compress.yaml) and write the table
          (markdown, with the command that ran the sweep), the raw rows (.json) and a plot of --metric
          against the sparsity reached, one line per pattern, each starting from the dense point (.png)

    python egs/tools/sparsity_sweep.py points --template conf/compress/sparse50.yaml \\
        --sparsities 0 50 70 80 90 --patterns unstructured row 2:4 --out-dir exp/base/sweep
    python egs/tools/sparsity_sweep.py table exp/base/sweep/RESULTS.json --metric bleu \\
        --command "./run.sh --stage 9 --stop_stage 9" --out exp/base/sparsity_sweep.md
"""
import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from results_table import markdown_table

#: Metrics the results scripts report, and whether higher is better.
METRICS = {"bleu": ("BLEU", True), "chrf": ("chrF", True), "wer": ("WER %", False), "cer": ("CER %", False)}
DENSE = "dense"
_N_OF_M = re.compile(r"^(\d+):(\d+)$")


class SweepError(ValueError):
    """A bad sweep option, template or results file; printed as one line, exit status 2."""


def pattern_points(pattern: str, sparsities: Sequence[float]) -> List[Tuple[str, float]]:
    """(point name, sparsity %) of ``pattern``: each of ``sparsities`` above 0, or for N:M its own 1-N/M."""
    match = _N_OF_M.match(pattern)
    if match:
        kept, group = map(int, match.groups())
        if not 0 < kept < group:
            raise SweepError(f"--patterns {pattern}: N:M needs 0 < N < M")
        return [(f"{kept}of{group}_{100 * (1 - kept / group):g}", 100 * (1 - kept / group))]
    if pattern not in ("unstructured", "row"):
        raise SweepError(f"--patterns: unknown pattern {pattern!r}; expected unstructured, row or N:M (e.g. 2:4)")
    return [(f"{pattern}_{value:g}", value) for value in sparsities if value > 0]


def sweep_points(sparsities: Sequence[float], patterns: Sequence[str]) -> List[Tuple[str, str, float]]:
    """(name, pattern, sparsity %) of every point: the dense one (when 0 is asked for) first."""
    for value in sparsities:
        if not 0 <= value < 100:
            raise SweepError(f"--sparsities: {value:g} is not a percentage in [0, 100)")
    points = [(f"{DENSE}_0", DENSE, 0.0)] if 0 in sparsities else []
    for pattern in patterns:
        points += [(name, pattern, value) for name, value in pattern_points(pattern, sparsities)]
    return points


def point_config(template: Dict[str, Any], pattern: str, sparsity: float) -> Dict[str, Any]:
    """The template with its train: target and pattern set; for the dense point every sparsity_* option
    removed (fairseq-train refuses pruning options without a target)."""
    train = dict(template["train"])
    if pattern == DENSE:
        train = {key: value for key, value in train.items() if not str(key).startswith("sparsity")}
    else:
        train.update(sparsity_target=round(sparsity / 100, 6), sparsity_pattern=pattern)
    return {**template, "train": train}


def read_template(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        raise SweepError(f"--template {path} does not exist")
    template = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(template, dict) or not isinstance(template.get("train"), dict):
        raise SweepError(f"--template {path}: expected a compression config with a train: section")
    if any(str(key).startswith("admm") for key in template["train"]):
        raise SweepError(f"--template {path} quantizes (admm_*); the sweep measures pruning alone: use a "
                         f"sparsity-only config such as conf/compress/sparse50.yaml")
    return template


def write_points(args: argparse.Namespace) -> None:
    template = read_template(args.template)
    points = sweep_points(args.sparsities, args.patterns)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    header = f"# Sparsity sweep point, written by egs/tools/sparsity_sweep.py points from {args.template}\n"
    for name, pattern, sparsity in points:
        text = yaml.safe_dump(point_config(template, pattern, sparsity), sort_keys=False)
        (args.out_dir / f"{name}.yaml").write_text(header + text, encoding="utf-8")
        print(name)


def point_of(exp_dir: Path) -> Tuple[str, float]:
    """(pattern, target sparsity %) of a decoded point, from the compress.yaml its fine-tune kept."""
    config = exp_dir / "compress.yaml"
    if not config.is_file():
        raise SweepError(f"{config} not found: {exp_dir} is not a fine-tune of the sweep")
    train = yaml.safe_load(config.read_text(encoding="utf-8"))["train"]
    if not train.get("sparsity_target"):
        return DENSE, 0.0
    return str(train.get("sparsity_pattern", "unstructured")), 100 * float(train["sparsity_target"])


def sweep_rows(results: Path, metric: str) -> List[Dict[str, Any]]:
    """One row per point of ``results`` (RESULTS.json): point, pattern, target and reached sparsity (%),
    the metric and its change from the dense point."""
    if not results.is_file():
        raise SweepError(f"{results} not found; the sweep's decoded points are scored into it first")
    rows = []
    for scored in json.loads(results.read_text(encoding="utf-8")):
        if metric not in scored:
            raise SweepError(f"{results}: its rows have no {metric!r} (they have {', '.join(sorted(scored))})")
        pattern, target = point_of(results.parent / scored["experiment"])
        reached = scored.get("sparsity")
        rows.append({"point": scored["experiment"], "pattern": pattern, "target": target,
                     "reached": 0.0 if reached is None else 100 * reached, metric: scored[metric]})
    dense = [row[metric] for row in rows if row["pattern"] == DENSE]
    for row in rows:
        row["delta"] = row[metric] - dense[0] if dense else None
    return rows


def plot(rows: List[Dict[str, Any]], metric: str, out: Path) -> None:
    """``metric`` against the reached sparsity, one line per pattern starting from the dense point."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    dense = [row for row in rows if row["pattern"] == DENSE]
    figure, axes = pyplot.subplots(figsize=(6, 4))
    for pattern in dict.fromkeys(row["pattern"] for row in rows if row["pattern"] != DENSE):
        line = dense + sorted((row for row in rows if row["pattern"] == pattern), key=lambda row: row["reached"])
        axes.plot([row["reached"] for row in line], [row[metric] for row in line], marker="o", label=pattern)
    if dense:
        axes.axhline(dense[0][metric], color="grey", linestyle=":", label="dense fine-tune")
    axes.set_xlabel("sparsity reached (% of the pruned weights)")
    axes.set_ylabel(METRICS[metric][0])
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    pyplot.close(figure)


def write_table(args: argparse.Namespace) -> None:
    rows = sweep_rows(args.results, args.metric)
    name, higher_is_better = METRICS[args.metric]
    change = f"change vs dense ({'higher' if higher_is_better else 'lower'} is better)"
    table = markdown_table(
        ["point", "pattern", "target %", "reached %", name, change],
        [[row["point"], row["pattern"], f"{row['target']:.1f}", f"{row['reached']:.1f}", f"{row[args.metric]:.2f}",
          "-" if row["delta"] is None else f"{row['delta']:+.2f}"] for row in rows],
    )
    text = (f"# Sparsity sweep: {name} against sparsity\n\nCommand: `{args.command}`\n\n"
            f"Every point fine-tunes the same trained model with the same budget (its fairseq-train arguments: "
            f"<point>/train.args in {args.results.parent}); dense_0 is that fine-tune without pruning.\n\n"
            f"{table}\n\n![{name} against sparsity]({args.out.with_suffix('.png').name})\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    plot(rows, args.metric, args.out.with_suffix(".png"))
    print(table)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    steps = parser.add_subparsers(dest="step", required=True)
    points = steps.add_parser("points", help="write the compression config of every sweep point")
    points.add_argument("--template", type=Path, required=True,
                        help="compression config (train: section) whose budget and schedule every point uses")
    points.add_argument("--sparsities", type=float, nargs="+", required=True,
                        help="target sparsities in percent; 0 adds the dense fine-tune")
    points.add_argument("--patterns", nargs="+", required=True, help="unstructured, row and/or N:M (e.g. 2:4)")
    points.add_argument("--out-dir", type=Path, required=True, help="where <point>.yaml go")
    points.set_defaults(run=write_points)
    table = steps.add_parser("table", help="table, raw rows and plot of the scored points")
    table.add_argument("results", type=Path, help="RESULTS.json of the decoded points (written by *_results.py)")
    table.add_argument("--metric", choices=sorted(METRICS), required=True, help="the metric plotted")
    table.add_argument("--command", default="(not given)", help="the command that ran the sweep, quoted in the table")
    table.add_argument("--out", type=Path, required=True,
                       help="the markdown table; the .json and .png of the same name go beside it")
    table.set_defaults(run=write_table)
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        args.run(args)
    except SweepError as error:
        print(f"sparsity_sweep.py: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
