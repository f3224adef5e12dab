"""``fairseq-accel-prepare``: build the plain-text parallel corpora that the recipes under ``egs/`` train on.

Subcommands:

* ``gettext`` -- a German->English (or any catalog language <-> English) corpus from this machine's
  gettext catalogs (offline; used by ``egs/mini_l10n``);
* ``iwslt14`` -- IWSLT'14 de-en from the extracted ``de-en.tgz``, processed like fairseq's
  ``prepare-iwslt14.sh`` (used by ``egs/iwslt14/nmt``).

Both write ``{train,valid,test}.{src,tgt}`` text files, one sentence per line, ready for BPE.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from fairseq_accel.data.gettext_corpus import (
    DEFAULT_TEST_FRACTION,
    DEFAULT_VALID_FRACTION,
    CorpusError,
    FilterConfig,
    build_corpus,
)
from fairseq_accel.data.iwslt14 import expected_files, prepare_iwslt14

PROG = "fairseq-accel-prepare"


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keep the hand-made line breaks of descriptions and examples; append defaults where there is one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.required or action.default in (None, argparse.SUPPRESS):
            return action.help or ""
        return f"{action.help} (default: %(default)s)"


def _run_gettext(args: argparse.Namespace) -> None:
    build_corpus(
        locale_dir=args.locale_dir,
        out_dir=args.out_dir,
        src_lang=args.src_lang,
        tgt_lang=args.tgt_lang,
        valid_fraction=args.valid_fraction,
        test_fraction=args.test_fraction,
        filters=FilterConfig(min_words=args.min_words, max_words=args.max_words, max_chars=args.max_chars),
    )


def _run_iwslt14(args: argparse.Namespace) -> None:
    if args.jobs < 1:
        raise CorpusError(f"--jobs must be >= 1, got {args.jobs}")
    prepare_iwslt14(args.orig_dir, args.out_dir, jobs=args.jobs)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``fairseq-accel-prepare`` and its subcommands."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Build the plain-text parallel corpora ({train,valid,test}.{src,tgt}, one\n"
        "sentence per line) that the fairseq_accel recipes train on.",
        formatter_class=_HelpFormatter,
        epilog="examples:\n"
        f"  {PROG} gettext --out-dir data/l10n.de-en\n"
        f"  {PROG} iwslt14 --orig-dir downloads/de-en --out-dir data/iwslt\n"
        f"run '{PROG} <command> --help' for the options of a command",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")

    gettext = commands.add_parser(
        "gettext",
        help="parallel corpus from this machine's gettext catalogs (offline)",
        formatter_class=_HelpFormatter,
        description="Pair every translated message of <locale-dir>/<lang>/LC_MESSAGES/*.mo with\n"
        "its English original. gettext msgids are English, so one of --src-lang and\n"
        "--tgt-lang must be 'en'; the other one names the catalog language.\n\n"
        "Steps (counts are printed after each): normalise whitespace and remove menu\n"
        "accelerators (_Open, &Open); drop empty, untranslated, format-only ('%s: %d'),\n"
        "too short and too long pairs; keep one translation per source sentence; assign\n"
        "each sentence to train/valid/test by an MD5 hash of its source side, so every\n"
        "machine with the same catalogs writes the same files.",
        epilog="example (German->English, ~37k/1k/1.2k train/valid/test pairs on Debian):\n"
        f"  {PROG} gettext --src-lang de --tgt-lang en --out-dir data/l10n\n"
        "  # writes data/l10n/{train,valid,test}.{de,en}",
    )
    gettext.add_argument(
        "--out-dir", type=Path, required=True, metavar="DIR", help="where to write the text files"
    )
    gettext.add_argument(
        "--locale-dir", type=Path, default=Path("/usr/share/locale"), metavar="DIR",
        help="root of the gettext catalogs",
    )
    gettext.add_argument(
        "--src-lang", default="de", metavar="LANG", help="source language (a catalog language or 'en')"
    )
    gettext.add_argument(
        "--tgt-lang", default="en", metavar="LANG", help="target language ('en' or a catalog language)"
    )
    gettext.add_argument(
        "--valid-fraction", type=float, default=DEFAULT_VALID_FRACTION, metavar="F",
        help="share of the sentences that go to valid (chosen by a hash of the source sentence)",
    )
    gettext.add_argument(
        "--test-fraction", type=float, default=DEFAULT_TEST_FRACTION, metavar="F",
        help="share of the sentences that go to test (chosen by a hash of the source sentence)",
    )
    defaults = FilterConfig()
    gettext.add_argument(
        "--min-words", type=int, default=defaults.min_words, metavar="N",
        help="drop a pair unless at least one side has this many words",
    )
    gettext.add_argument(
        "--max-words", type=int, default=defaults.max_words, metavar="N",
        help="drop a pair if a side has more words",
    )
    gettext.add_argument(
        "--max-chars", type=int, default=defaults.max_chars, metavar="N",
        help="drop a pair if a side has more characters",
    )
    gettext.set_defaults(func=_run_gettext)

    iwslt14 = commands.add_parser(
        "iwslt14",
        help="IWSLT'14 German-English, processed like fairseq's prepare-iwslt14.sh",
        formatter_class=_HelpFormatter,
        description="Prepare IWSLT'14 de-en from the folder extracted from de-en.tgz the way\n"
        "fairseq's examples/translation/prepare-iwslt14.sh does, so that BLEU is\n"
        "comparable with published numbers:\n"
        "  train  metadata lines dropped, Moses-tokenized (sacremoses, tokenizer.perl\n"
        "         defaults), pairs of 1-175 tokens with length ratio <= 1.5, lowercased\n"
        "  valid  every 23rd pair of that (train keeps the rest)\n"
        "  test   dev2010 + TEDX.dev2012 + tst2010 + tst2011 + tst2012, tokenized,\n"
        "         lowercased\n"
        "Files read from --orig-dir:\n  " + "\n  ".join(expected_files()),
        epilog="example:\n"
        "  tar xzf de-en.tgz -C downloads   # creates downloads/de-en/\n"
        f"  {PROG} iwslt14 --orig-dir downloads/de-en \\\n"
        "      --out-dir data/iwslt14.de-en --jobs 8\n"
        "  # writes data/iwslt14.de-en/{train,valid,test}.{de,en}:\n"
        "  # about 160k/7.3k/6.8k pairs",
    )
    iwslt14.add_argument(
        "--orig-dir", type=Path, required=True, metavar="DIR",
        help="the extracted 'de-en' folder of de-en.tgz",
    )
    iwslt14.add_argument(
        "--out-dir", type=Path, required=True, metavar="DIR", help="where to write the text files"
    )
    iwslt14.add_argument(
        "--jobs", type=int, default=1, metavar="N",
        help="tokenizer processes (the output does not depend on it)",
    )
    iwslt14.set_defaults(func=_run_iwslt14)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); return the exit status.

    Problems with the input data or options are printed as one ``fairseq-accel-prepare: error:`` line
    and give exit status 2.
    """
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except CorpusError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
