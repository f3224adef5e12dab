#!/usr/bin/env python3
"""Collect the results of NMT experiments into one table (markdown), as recipes print at the end.

For each experiment directory it reads
  decode_<subset>/hyp.txt, ref.txt  hypotheses and references in corpus order, BPE removed
  decode_<subset>/generate.txt      fairseq-generate's log ("Translated N sentences (T tokens) in S s")
  profile.json                      fairseq-accel-profile --no-baseline --format json of the checkpoint
  checkpoints/checkpoint_last.pt    of a compression fine-tune (compress.yaml): the sparsity it reached
and scores BLEU and chrF with sacrebleu. Raw text (the mini corpus) is scored with sacrebleu's standard
13a tokenization; IWSLT'14 text is already Moses-tokenized and lowercased, and the paper convention
scores it as it is (``--bleu-tokenize none``, what fairseq's and multi-bleu's BLEU do).

    python egs/tools/nmt_results.py exp/lite_transformer_mini exp/transformer_mini --out exp/RESULTS.md
"""
import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

import sacrebleu

from results_table import ResultsError, decode_speed, millions, percent, reached_sparsity, read_pairs, results_main

COLUMNS = ["experiment", "arch", "params w/o emb", "Mult-Adds (30 tok)", "BLEU", "chrF", "sparsity %", "decode s",
           "tokens/s"]


def score_experiment(exp_dir: Path, args: argparse.Namespace) -> Dict[str, object]:
    decode_dir = exp_dir / f"decode_{args.subset}"
    hypotheses, references = read_pairs(decode_dir)
    profile_path = exp_dir / "profile.json"
    if not profile_path.is_file():
        raise ResultsError(f"{profile_path} not found; the decoding stage writes it with fairseq-accel-profile")
    model = json.loads(profile_path.read_text())["model"]
    return {
        "experiment": exp_dir.name,
        "arch": model["arch"],
        "params": model["parameters"]["non_embedding"],
        "mult_adds": model["mult_adds"]["total"],
        "bleu": sacrebleu.corpus_bleu(hypotheses, [references], tokenize=args.bleu_tokenize).score,
        "chrf": sacrebleu.corpus_chrf(hypotheses, [references]).score,
        "sparsity": reached_sparsity(exp_dir),
        **decode_speed(decode_dir / "generate.txt"),
    }


def table_row(row: Dict[str, object]) -> List[str]:
    return [
        row["experiment"], row["arch"], millions(row["params"]), millions(row["mult_adds"]),
        f"{row['bleu']:.2f}", f"{row['chrf']:.2f}", percent(row["sparsity"]), f"{row['seconds']:.1f}",
        f"{row['tokens_per_s']:.0f}",
    ]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bleu-tokenize", default="13a", help="sacrebleu tokenizer (none for tokenized text)")


def main(argv: Optional[List[str]] = None) -> int:
    return results_main(argv, __doc__, COLUMNS, score_experiment, table_row, add_arguments)


if __name__ == "__main__":
    sys.exit(main())
