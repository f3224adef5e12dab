#!/usr/bin/env python3
"""Collect the results of NMT experiments into one table (markdown), as recipes print at the end.

For each experiment directory it reads
  decode_<subset>/hyp.txt, ref.txt  hypotheses and references in corpus order, BPE removed
  decode_<subset>/generate.txt      fairseq-generate's log ("Translated N sentences (T tokens) in S s")
  profile.json                      fairseq-accel-profile --no-baseline --format json of the checkpoint
and scores BLEU and chrF with sacrebleu. Raw text (the mini corpus) is scored with sacrebleu's standard
13a tokenization; IWSLT'14 text is already Moses-tokenized and lowercased, and the paper convention
scores it as it is (``--bleu-tokenize none``, what fairseq's and multi-bleu's BLEU do).

    python egs/tools/nmt_results.py exp/lite_transformer_mini exp/transformer_mini --out exp/RESULTS.md
"""
import argparse
import json
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional

import sacrebleu

GENERATE_SUMMARY = re.compile(
    r"Translated ([\d,]+) sentences \(([\d,]+) tokens\) in ([\d.]+)s \(([\d.]+) sentences/s, ([\d.]+) tokens/s\)"
)
COLUMNS = ["experiment", "arch", "params w/o emb", "Mult-Adds (30 tok)", "BLEU", "chrF", "decode s", "tokens/s"]


class ResultsError(RuntimeError):
    """A file an experiment should have is missing or malformed."""


def read_lines(path: Path) -> List[str]:
    if not path.is_file():
        raise ResultsError(f"{path} not found; run the decoding stage for this experiment first")
    return path.read_text(encoding="utf-8").splitlines()


def decode_speed(generate_log: Path) -> Dict[str, float]:
    """Seconds and tokens/s of the generation loop, from fairseq-generate's summary line."""
    matches = GENERATE_SUMMARY.findall("\n".join(read_lines(generate_log)))
    if not matches:
        raise ResultsError(f"{generate_log}: no 'Translated N sentences ... tokens/s' line; did fairseq-generate finish?")
    sentences, tokens, seconds, _, tokens_per_second = matches[-1]
    return {"sentences": int(sentences.replace(",", "")), "seconds": float(seconds), "tokens_per_s": float(tokens_per_second)}


def score_experiment(exp_dir: Path, subset: str, bleu_tokenize: str) -> Dict[str, object]:
    decode_dir = exp_dir / f"decode_{subset}"
    hypotheses = read_lines(decode_dir / "hyp.txt")
    references = read_lines(decode_dir / "ref.txt")
    if len(hypotheses) != len(references):
        raise ResultsError(
            f"{decode_dir}: {len(hypotheses)} hypotheses but {len(references)} references; decoding was cut short"
        )
    profile_path = exp_dir / "profile.json"
    if not profile_path.is_file():
        raise ResultsError(f"{profile_path} not found; the decoding stage writes it with fairseq-accel-profile")
    model = json.loads(profile_path.read_text())["model"]
    return {
        "experiment": exp_dir.name,
        "arch": model["arch"],
        "params": model["parameters"]["non_embedding"],
        "mult_adds": model["mult_adds"]["total"],
        "bleu": sacrebleu.corpus_bleu(hypotheses, [references], tokenize=bleu_tokenize).score,
        "chrf": sacrebleu.corpus_chrf(hypotheses, [references]).score,
        **decode_speed(decode_dir / "generate.txt"),
    }


def _millions(value: float) -> str:
    return f"{value / 1e6:.2f}M"


def markdown_table(rows: List[Dict[str, object]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [
            row["experiment"], row["arch"], _millions(row["params"]), _millions(row["mult_adds"]),
            f"{row['bleu']:.2f}", f"{row['chrf']:.2f}", f"{row['seconds']:.1f}", f"{row['tokens_per_s']:.0f}",
        ]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("exp_dirs", nargs="+", type=Path, help="experiment directories (exp/<config name>)")
    parser.add_argument("--subset", default="test", help="decoded split (decode_<subset>/)")
    parser.add_argument("--bleu-tokenize", default="13a", help="sacrebleu tokenizer (none for tokenized text)")
    parser.add_argument("--out", type=Path, help="also write the table (markdown) and results.json beside it")
    args = parser.parse_args(argv)
    try:
        rows = [score_experiment(exp_dir, args.subset, args.bleu_tokenize) for exp_dir in args.exp_dirs]
    except ResultsError as error:
        print(f"nmt_results.py: error: {error}", file=sys.stderr)
        return 2
    table = markdown_table(rows)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n", encoding="utf-8")
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
