#!/usr/bin/env python3
"""A speech_to_text manifest whose targets are a teacher's transcripts (sequence-level KD, Kim & Rush 2016).

Reads fairseq-generate's output of the manifest's split (``D-<index>`` lines: the detokenized hypothesis of
the manifest's row ``index``) and writes the manifest with each ``tgt_text`` replaced; every row must have
a hypothesis.

    python egs/tools/teacher_manifest.py data/s2t/train.tsv exp/teacher/targets/generate.txt --out OUT/train.tsv
"""
import argparse
import csv
import sys
from pathlib import Path
from typing import Dict, List, Optional


def hypotheses(generate_txt: Path) -> Dict[int, str]:
    """Row index -> detokenized hypothesis, from the ``D-`` lines of fairseq-generate's output."""
    found = {}
    for line in generate_txt.read_text(encoding="utf-8").splitlines():
        if line.startswith("D-"):
            index, _score, *text = line[2:].split("\t")
            found[int(index)] = text[0] if text else ""
    return found


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest", type=Path, help="speech_to_text TSV manifest (id, audio, n_frames, tgt_text, ...)")
    parser.add_argument("generate_txt", type=Path, help="fairseq-generate output of that manifest's split")
    parser.add_argument("--out", type=Path, required=True, help="manifest to write")
    args = parser.parse_args(argv)
    with open(args.manifest, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    found = hypotheses(args.generate_txt)
    missing = [index for index in range(len(rows)) if index not in found]
    if missing:
        print(f"teacher_manifest.py: error: {args.generate_txt} has no hypothesis for {len(missing)} of the "
              f"{len(rows)} rows of {args.manifest} (first: row {missing[0]})", file=sys.stderr)
        return 1
    for index, row in enumerate(rows):
        row["tgt_text"] = found[index]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t", quoting=csv.QUOTE_NONE,
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
