#!/usr/bin/env python3
"""The post-training compression table of a recipe (egs/tools/compress_stages.sh, quantize_stage): for every
model compressed into ``<exp>__int8`` (fairseq-accel-compress), its weight bytes before and after, the
accuracy metric and the decoding speed of both, and the metric against size as a PNG.

It reads the scored rows of the models and their compressed copies (the results script's RESULTS.json:
``experiment``, the metric, the speed, ``sparsity``) and, for each compressed copy, the last line of
fairseq-accel-compress's size table in ``<exp dir>/<model>__int8/compress.log`` ("total: N bytes, fp32 M
bytes"): every parameter counted, embeddings included, shared tensors once.

    python egs/tools/compression_table.py exp/compression/RESULTS.json --exp-dir exp --metric bleu \\
        --speed tokens_per_s --out exp/COMPRESSION.md    # also exp/COMPRESSION.json, exp/compression.png
"""
import argparse
import json
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional

from results_table import ResultsError, markdown_table, percent, read_lines

SUFFIX = "__int8"
TOTAL = re.compile(r"^total: ([\d,]+) bytes, fp32 ([\d,]+) bytes")
#: Metrics where lower is better (the others, BLEU and chrF, are higher-is-better).
ERROR_RATES = ("wer", "cer")


def stored_bytes(compress_log: Path) -> Dict[str, int]:
    """Stored and float32 bytes of a compressed checkpoint, from fairseq-accel-compress's output."""
    for line in reversed(read_lines(compress_log)):
        match = TOTAL.match(line)
        if match:
            return {"bytes": int(match.group(1).replace(",", "")), "fp32_bytes": int(match.group(2).replace(",", ""))}
    raise ResultsError(f"{compress_log}: no 'total: N bytes, fp32 M bytes' line; did fairseq-accel-compress finish?")


def compression_rows(results: List[Dict[str, object]], exp_dir: Path, metric: str, speed: str) -> List[Dict[str, object]]:
    """One row per compressed model: its source's and its own bytes, metric and speed."""
    by_name = {row["experiment"]: row for row in results}
    rows = []
    for name, compressed in by_name.items():
        if not name.endswith(SUFFIX):
            continue
        source = by_name.get(name[: -len(SUFFIX)])
        if source is None:
            raise ResultsError(f"{name} is scored but its model {name[:-len(SUFFIX)]} is not; score both")
        for row in (source, compressed):
            for key in (metric, speed):
                if key not in row:
                    raise ResultsError(f"{row['experiment']} has no '{key}' (its keys: {', '.join(sorted(row))})")
        sizes = stored_bytes(exp_dir / name / "compress.log")
        rows.append({
            "model": source["experiment"], "sparsity": source.get("sparsity"), **sizes,
            "ratio": sizes["fp32_bytes"] / sizes["bytes"],
            "metric": metric, "before": source[metric], "after": compressed[metric],
            "change": compressed[metric] - source[metric],
            "speed": speed, "speed_before": source[speed], "speed_after": compressed[speed],
        })
    if not rows:
        raise ResultsError(f"no compressed model (<model>{SUFFIX}) among {', '.join(by_name)}")
    return rows


def table(rows: List[Dict[str, object]]) -> str:
    metric, speed = rows[0]["metric"].upper(), rows[0]["speed"].replace("_per_s", "/s")
    columns = ["model", "sparsity %", "fp32 MB", "compressed MB", "x smaller", f"{metric} fp32", f"{metric} int8",
               "change", f"{speed} fp32", f"{speed} int8", "speed-up"]
    return markdown_table(columns, [[
        row["model"], percent(row["sparsity"]), f"{row['fp32_bytes'] / 1e6:.2f}", f"{row['bytes'] / 1e6:.2f}",
        f"{row['ratio']:.2f}", f"{row['before']:.2f}", f"{row['after']:.2f}", f"{row['change']:+.2f}",
        f"{row['speed_before']:.1f}", f"{row['speed_after']:.1f}", f"{row['speed_after'] / row['speed_before']:.2f}",
    ] for row in rows])


def plot(rows: List[Dict[str, object]], out: Path) -> None:
    """The metric against weight megabytes: each model's float32 point, an arrow to its compressed one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    metric = rows[0]["metric"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for index, row in enumerate(rows):
        color = f"C{index % 10}"
        before, after = (row["fp32_bytes"] / 1e6, row["before"]), (row["bytes"] / 1e6, row["after"])
        ax.annotate("", xy=after, xytext=before, arrowprops={"arrowstyle": "->", "color": color, "alpha": 0.6})
        ax.scatter(*before, marker="o", color=color)
        ax.scatter(*after, marker="s", color=color, label=f"{row['model']} ({row['ratio']:.1f}x)")
    ax.set_xscale("log")
    sizes = sorted({round(row[key] / 1e6, 2) for row in rows for key in ("fp32_bytes", "bytes")})
    ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(sizes))  # a tick at every model's size
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    values = [row[key] for row in rows for key in ("before", "after")]
    # at least 10 % of the metric (or 1 point) tall, so that a change of 0.1 does not fill the plot
    span, middle = max(max(values) - min(values), 0.1 * max(values), 1.0), (max(values) + min(values)) / 2
    ax.set_ylim(middle - 0.6 * span, middle + 0.6 * span)
    ax.set_xlabel("weight bytes (MB, log scale): float32 (o) -> compressed (s)")
    ax.set_ylabel(f"{metric.upper()} ({'lower' if metric in ERROR_RATES else 'higher'} is better)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="RESULTS.json of the models and their <model>__int8 copies")
    parser.add_argument("--exp-dir", type=Path, required=True, help="the folder of the <model>__int8 experiments")
    parser.add_argument("--metric", required=True, help="key of the accuracy metric in the rows: bleu, wer, cer")
    parser.add_argument("--speed", required=True, help="key of the decoding speed: tokens_per_s, utterances_per_s")
    parser.add_argument("--out", type=Path, required=True,
                        help="the table (markdown); <out>.json and compression.png are written beside it")
    args = parser.parse_args(argv)
    try:
        rows = compression_rows(json.loads("\n".join(read_lines(args.results))), args.exp_dir, args.metric, args.speed)
    except (ResultsError, json.JSONDecodeError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    text = table(rows)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n", encoding="utf-8")
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    plot(rows, args.out.parent / "compression.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
