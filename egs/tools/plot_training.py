#!/usr/bin/env python3
"""Training curves of the recipes' experiments: training loss (solid) and validation loss (dashed, with
markers) against the update, one colour per experiment, from each EXP_DIR/train.log that fairseq-train
wrote with --log-format simple (its train_inner lines and its "valid on '<subset>' subset" lines, whatever
the subset is called: valid for NMT, dev for ASR). The recipes' results stage draws it into
exp/training_curves.png:

    python egs/tools/plot_training.py exp/lite_transformer_mini exp/transformer_mini \\
        --out exp/training_curves.png --title "mini_l10n NMT"
"""
import argparse
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from results_table import ResultsError

#: (updates, losses) of one curve.
Curve = Tuple[List[int], List[float]]

# "loss=4.26," in a train_inner line, "| loss 6.041 |" in a validation line; \b keeps nll_loss out
_TRAIN_INNER = re.compile(r"\| train_inner \|.*?\bloss=([^,\s]+).*\bnum_updates=(\d+)")
_VALID = re.compile(r"\| valid on '[^']+' subset \|.*?\bloss ([^\s|]+).*\bnum_updates (\d+)")


def read_curves(log: Path) -> Dict[str, Curve]:
    """The "train" (train_inner) and "valid" curves of a fairseq-train log, each sorted by update; where a
    resumed training logged an update again, its later value counts."""
    if not log.is_file():
        raise ResultsError(f"{log} not found; run the training stage for this experiment first")
    points: Dict[str, Dict[int, float]] = {"train": {}, "valid": {}}
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        for name, pattern in (("train", _TRAIN_INNER), ("valid", _VALID)):
            match = pattern.search(line)
            if match:
                points[name][int(match.group(2))] = float(match.group(1))
    if not points["train"] and not points["valid"]:
        raise ResultsError(f"{log}: no train_inner or 'valid on' loss line; was it written by fairseq-train "
                           f"with --log-format simple, and did it reach its first --log-interval?")
    return {name: (sorted(values), [values[update] for update in sorted(values)]) for name, values in points.items()}


def agg_pyplot():
    """matplotlib's pyplot on the Agg backend (PNG files, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot


def save_figure(figure, out: Path) -> None:
    """Write ``figure`` to ``out`` (its folder made) and free it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    agg_pyplot().close(figure)


def plot_curves(curves: Dict[str, Dict[str, Curve]], out: Path, title: Optional[str] = None) -> None:
    """One line pair per experiment of ``curves`` (experiment name -> :func:`read_curves`) in one figure."""
    pyplot = agg_pyplot()
    figure, axes = pyplot.subplots(figsize=(7, 4.5))
    colours = pyplot.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (name, curve) in enumerate(curves.items()):
        colour = colours[index % len(colours)]
        axes.plot(*curve["train"], color=colour, label=f"{name} (train)")
        axes.plot(*curve["valid"], color=colour, linestyle="--", marker="o", label=f"{name} (valid)")
    axes.set_xlabel("update")
    axes.set_ylabel("loss")
    if title:
        axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    save_figure(figure, out)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("exp_dirs", nargs="+", type=Path, help="experiment directories (each with its train.log)")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--title", help="title of the figure")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        curves = {exp_dir.resolve().name: read_curves(exp_dir / "train.log") for exp_dir in args.exp_dirs}
    except ResultsError as error:
        print(f"plot_training.py: error: {error}", file=sys.stderr)
        return 2
    plot_curves(curves, args.out, args.title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
