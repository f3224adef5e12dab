"""Pieces shared by the recipes' result scripts (nmt_results.py, asr_results.py): reading the files a
decoding stage leaves, fairseq-generate's timing line, and a markdown table."""
import argparse
import json
import re
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

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
    """Sentences, seconds and tokens/s of the generation loop, from fairseq-generate's summary line."""
    matches = GENERATE_SUMMARY.findall("\n".join(read_lines(generate_log)))
    if not matches:
        raise ResultsError(f"{generate_log}: no 'Translated N sentences ... tokens/s' line; did fairseq-generate finish?")
    sentences, _, seconds, _, tokens_per_second = matches[-1]
    return {"sentences": int(sentences.replace(",", "")), "seconds": float(seconds), "tokens_per_s": float(tokens_per_second)}


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
