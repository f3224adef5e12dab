#!/usr/bin/env python3
"""Collect the results of ASR experiments into one table (markdown), as recipes print at the end.

For each experiment directory it reads
  decode_<subset>/hyp.txt, ref.txt  detokenized hypotheses and references in corpus order
  decode_<subset>/generate.txt      fairseq-generate's log ("Translated N sentences (T tokens) in S s")
  checkpoints/checkpoint_best.pt    the decoded model (architecture, parameter count); checkpoint_last.pt for
                                    a compression fine-tune (compress.yaml), with the sparsity it reached
and scores word and character error rates with jiwer (CER over characters with spaces removed, the
convention for Mandarin, where it is the metric that counts).

    python egs/tools/asr_results.py exp/s2t_sanm_mini exp/s2t_transformer_mini --out exp/RESULTS.md
"""
import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional

import jiwer

from results_table import (decode_speed, decoded_checkpoint, load_checkpoint, millions, percent, read_pairs,
                           results_main, sparsity_of)

COLUMNS = ["experiment", "arch", "params", "WER %", "CER %", "sparsity %", "decode s", "utterances/s"]


def checkpoint_summary(checkpoint: Path) -> Dict[str, object]:
    """Architecture name, parameter count and reached sparsity (None: not pruned) of a fairseq checkpoint."""
    state = load_checkpoint(checkpoint)
    model_cfg = state["cfg"]["model"]
    return {"arch": getattr(model_cfg, "arch", None) or model_cfg.get("_name"),
            "params": sum(tensor.numel() for tensor in state["model"].values()),
            "sparsity": sparsity_of(state)}


def character_error_rate(references: List[str], hypotheses: List[str]) -> float:
    return jiwer.cer([r.replace(" ", "") for r in references], [h.replace(" ", "") for h in hypotheses])


def score_experiment(exp_dir: Path, args: argparse.Namespace) -> Dict[str, object]:
    decode_dir = exp_dir / f"decode_{args.subset}"
    hypotheses, references = read_pairs(decode_dir)
    speed = decode_speed(decode_dir / "generate.txt")
    return {
        "experiment": exp_dir.name,
        **checkpoint_summary(decoded_checkpoint(exp_dir)),
        "wer": 100 * jiwer.wer(references, hypotheses),
        "cer": 100 * character_error_rate(references, hypotheses),
        "utterances_per_s": speed["sentences_per_s"],
        **speed,
    }


def table_row(row: Dict[str, object]) -> List[str]:
    return [
        row["experiment"], row["arch"], millions(row["params"]), f"{row['wer']:.2f}", f"{row['cer']:.2f}",
        percent(row["sparsity"]), f"{row['seconds']:.1f}", f"{row['utterances_per_s']:.1f}",
    ]


def main(argv: Optional[List[str]] = None) -> int:
    return results_main(argv, __doc__, COLUMNS, score_experiment, table_row)


if __name__ == "__main__":
    sys.exit(main())
