#!/usr/bin/env python3
"""Train a joint sentencepiece BPE model and encode text with it (fairseq's ``scripts/spm_*.py``
are not installed with the fairseq wheel).

    python egs/tools/spm.py train --input data/train.de data/train.en \\
        --model-prefix data/spm/bpe10000 --vocab-size 10000
    python egs/tools/spm.py encode --model data/spm/bpe10000.model --input data/test.de \\
        --output data/spm/test.de

Encoded lines are space-separated pieces (``▁`` marks a word start), which ``fairseq-generate
--remove-bpe sentencepiece`` turns back into the input text. Normalisation is off (``identity``) so
that this round trip is exact and BLEU is computed on the very text the references hold.
"""
import argparse
import sys
from pathlib import Path
from typing import List, Optional

import sentencepiece as spm


def train(inputs: List[Path], model_prefix: Path, vocab_size: int, model_type: str, threads: int) -> None:
    """Train ``<model_prefix>.model``/``.vocab`` on all lines of ``inputs`` (every character kept)."""
    missing = [str(path) for path in inputs if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"training text not found: {', '.join(missing)}")
    model_prefix.parent.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        input=[str(path) for path in inputs],
        model_prefix=str(model_prefix),
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=1.0,
        normalization_rule_name="identity",
        num_threads=threads,
        minloglevel=1,
    )


def encode(model: Path, input_path: Path, output_path: Path) -> int:
    """Write the pieces of every line of ``input_path`` to ``output_path``; return the line count."""
    processor = spm.SentencePieceProcessor(model_file=str(model))
    with open(input_path, encoding="utf-8", newline="\n") as fh:  # only "\n" ends a line
        lines = [line.rstrip("\n") for line in fh]
    pieces = processor.encode(lines, out_type=str)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    output_path.write_text("".join(" ".join(line) + "\n" for line in pieces), encoding="utf-8")
    return len(lines)


def main(argv: Optional[List[str]] = None) -> int:
    """``train`` or ``encode`` as given on the command line; exit status 2 for a bad input."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train_cmd = commands.add_parser("train", help="train a sentencepiece model on text files")
    train_cmd.add_argument(
        "--input", type=Path, nargs="+", required=True, help="training text, one sentence a line"
    )
    train_cmd.add_argument(
        "--model-prefix", type=Path, required=True, help="writes PREFIX.model and PREFIX.vocab"
    )
    train_cmd.add_argument("--vocab-size", type=int, required=True, help="number of pieces")
    train_cmd.add_argument("--model-type", default="bpe", choices=["bpe", "unigram", "char", "word"])
    train_cmd.add_argument("--threads", type=int, default=1, help="trainer threads")
    encode_cmd = commands.add_parser("encode", help="encode a text file into space-separated pieces")
    encode_cmd.add_argument("--model", type=Path, required=True, help="a .model file written by train")
    encode_cmd.add_argument("--input", type=Path, required=True, help="text, one sentence a line")
    encode_cmd.add_argument("--output", type=Path, required=True, help="where to write the pieces")
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            train(args.input, args.model_prefix, args.vocab_size, args.model_type, args.threads)
        else:
            if not args.input.is_file():
                raise FileNotFoundError(f"input text {args.input} not found")
            if not args.model.is_file():
                raise FileNotFoundError(f"sentencepiece model {args.model} not found")
            n = encode(args.model, args.input, args.output)
            print(f"encoded {args.input} -> {args.output}: {n} lines", file=sys.stderr)
    except (FileNotFoundError, RuntimeError) as err:
        # sentencepiece reports problems such as a too large vocabulary as RuntimeError
        print(f"spm.py {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
