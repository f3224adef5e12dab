"""Pieces shared by the recipes' result scripts (nmt_results.py, asr_results.py): reading the files a
decoding stage leaves, fairseq-generate's timing line, the decoded checkpoint and the sparsity a
compression fine-tune reached, and a markdown table."""
import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

GENERATE_SUMMARY = re.compile(
    r"Translated ([\d,]+) sentences \(([\d,]+) tokens\) in ([\d.]+)s \(([\d.]+) sentences/s, ([\d.]+) tokens/s\)"
)


class ResultsError(RuntimeError):
    """A file an experiment should have is missing or malformed."""


def read_lines(path: Path) -> List[str]:
    if not path.is_file():
        raise ResultsError(f"{path} not found; run the decoding stage for this experiment first")
    return path.read_text(encoding="utf-8").splitlines()


def read_pairs(decode_dir: Path) -> List[List[str]]:
    """Hypotheses and references of one decoding, checked to be complete."""
    hypotheses = read_lines(decode_dir / "hyp.txt")
    references = read_lines(decode_dir / "ref.txt")
    if len(hypotheses) != len(references):
        raise ResultsError(
            f"{decode_dir}: {len(hypotheses)} hypotheses but {len(references)} references; decoding was cut short"
        )
    return [hypotheses, references]


def decode_speed(generate_log: Path) -> Dict[str, float]:
    """Sentences, seconds, sentences/s and tokens/s of the generation loop, from fairseq-generate's summary line
    (its rates come from the unrounded time: a fast decode prints "in 0.0s")."""
    matches = GENERATE_SUMMARY.findall("\n".join(read_lines(generate_log)))
    if not matches:
        raise ResultsError(f"{generate_log}: no 'Translated N sentences ... tokens/s' line; did fairseq-generate finish?")
    sentences, _, seconds, sentences_per_second, tokens_per_second = matches[-1]
    return {"sentences": int(sentences.replace(",", "")), "seconds": float(seconds),
            "sentences_per_s": float(sentences_per_second), "tokens_per_s": float(tokens_per_second)}


def decoded_checkpoint(exp_dir: Path) -> Path:
    """The checkpoint the decoding stage used (the rule of decoded_checkpoint in fairseq_stages.sh):
    ``compressed.pt`` of a post-training compression, checkpoint_last.pt of a compression fine-tune
    (``compress.yaml`` beside it), else the averaged checkpoint_average.pt where there is one, else
    checkpoint_best.pt."""
    checkpoints = exp_dir / "checkpoints"
    if (exp_dir / "compressed.pt").is_file():
        return exp_dir / "compressed.pt"
    if (exp_dir / "compress.yaml").is_file():
        return checkpoints / "checkpoint_last.pt"
    if (checkpoints / "checkpoint_average.pt").is_file():
        return checkpoints / "checkpoint_average.pt"
    return checkpoints / "checkpoint_best.pt"


def load_checkpoint(checkpoint: Path) -> Dict[str, Any]:
    """A fairseq checkpoint, read with the plugin's safe loader (torch >= 2.6)."""
    if not checkpoint.is_file():
        raise ResultsError(f"{checkpoint} not found; run the training stage for this experiment first")
    import fairseq_accel.plugin  # noqa: F401  (registers the models and tasks; safe checkpoint loading)
    from fairseq import checkpoint_utils

    return checkpoint_utils.load_checkpoint_to_cpu(str(checkpoint))


def sparsity_of(state: Dict[str, Any]) -> Optional[float]:
    """Share of zeros in the weights a compression fine-tune pruned (those its saved sparsity masks name),
    counted in the saved weights themselves; None for a checkpoint trained without pruning."""
    from fairseq_accel.compression import COMPRESSION_KEY

    compression = (state.get("task_state") or {}).get(COMPRESSION_KEY) or {}
    masks = (compression.get("sparsity") or {}).get("masks")
    if not masks:
        return None
    weights = [state["model"][name] for name in masks]
    return sum(int((weight == 0).sum()) for weight in weights) / sum(weight.numel() for weight in weights)


def reached_sparsity(exp_dir: Path) -> Optional[float]:
    """:func:`sparsity_of` the decoded checkpoint of a compression fine-tune; None (no checkpoint read)
    for any other experiment."""
    if not (exp_dir / "compress.yaml").is_file():
        return None
    return sparsity_of(load_checkpoint(decoded_checkpoint(exp_dir)))


def percent(value: Optional[float]) -> str:
    """A fraction as a percentage with one decimal, or '-' when there is none."""
    return "-" if value is None else f"{100 * value:.1f}"


def millions(value: float) -> str:
    return f"{value / 1e6:.2f}M"


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def results_main(
    argv: Optional[Sequence[str]],
    description: str,
    columns: Sequence[str],
    score_experiment: Callable[[Path, argparse.Namespace], Dict[str, object]],
    table_row: Callable[[Dict[str, object]], Sequence[object]],
    add_arguments: Callable[[argparse.ArgumentParser], None] = lambda parser: None,
) -> int:
    """The command line of a results script: score each experiment, print the table, write it with --out."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("exp_dirs", nargs="+", type=Path, help="experiment directories (exp/<config name>)")
    parser.add_argument("--subset", default="test", help="decoded split (decode_<subset>/)")
    parser.add_argument("--out", type=Path, help="also write the table (markdown) and <out>.json beside it")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        rows = [score_experiment(exp_dir, args) for exp_dir in args.exp_dirs]
    except ResultsError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    table = markdown_table(columns, [table_row(row) for row in rows])
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n", encoding="utf-8")
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0
