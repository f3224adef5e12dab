"""``fairseq-accel-prepare``: build the plain-text parallel corpora that the recipes under ``egs/`` train on.

Subcommands:

* ``gettext`` -- a German->English (or any catalog language <-> English) corpus from this machine's
  gettext catalogs (offline; used by ``egs/mini_l10n``);
* ``iwslt14`` -- IWSLT'14 de-en from the extracted ``de-en.tgz``, processed like fairseq's
  ``prepare-iwslt14.sh`` (used by ``egs/iwslt14/nmt``);
* ``espeak`` -- an English speech corpus synthesized offline by espeak-ng from the English side of the
  gettext corpus (used by ``egs/mini_espeak``);
* ``aishell`` -- AISHELL-1 (Mandarin) from the extracted ``data_aishell`` folder (used by ``egs/aishell``).
* ``s2t`` -- from such Kaldi data directories, the fbank features, manifests, sentencepiece vocabulary
  and ``config.yaml`` that fairseq's stock ``--task speech_to_text`` reads;
* ``spm train`` / ``spm encode`` -- a sentencepiece model on text files, and text files encoded into
  pieces (used by the NMT recipes between the text corpus and fairseq-preprocess).

Each subcommand is one pair here: ``_add_<name>_command`` (its options and help) and ``_run_<name>``.

The text corpora are ``{train,valid,test}.{src,tgt}`` files, one sentence per line, ready for BPE; the
speech corpora are Kaldi data directories ``{train,dev,test}/{wav.scp,text,utt2spk,spk2utt}``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from fairseq_accel.data import espeak_corpus
from fairseq_accel.data.aishell import TRANSCRIPT, prepare_aishell
from fairseq_accel.data.errors import CorpusError
from fairseq_accel.data.gettext_corpus import (
    DEFAULT_TEST_FRACTION,
    DEFAULT_VALID_FRACTION,
    FilterConfig,
    build_corpus,
)
from fairseq_accel.data.iwslt14 import expected_files, prepare_iwslt14
from fairseq_accel.data.s2t_manifest import (
    DEFAULT_LOG_EVERY,
    DEFAULT_MAX_FRAMES,
    UNITS,
    S2TOptions,
    prepare_s2t,
)
from fairseq_accel.data.sentencepiece_model import (
    MODEL_TYPES,
    SentencePieceSettings,
    encode_file,
    train_sentencepiece,
)

PROG = "fairseq-accel-prepare"


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keep the hand-made line breaks of descriptions and examples; append defaults where there is one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.required or action.default in (None, argparse.SUPPRESS):
            return action.help or ""
        return f"{action.help} (default: %(default)s)"


def _add_gettext_command(commands: argparse._SubParsersAction) -> None:
    """The ``gettext`` subcommand: a parallel corpus from the machine's gettext catalogs."""
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


def _add_iwslt14_command(commands: argparse._SubParsersAction) -> None:
    """The ``iwslt14`` subcommand: IWSLT'14 de-en processed like fairseq's prepare-iwslt14.sh."""
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


def _run_iwslt14(args: argparse.Namespace) -> None:
    if args.jobs < 1:
        raise CorpusError(f"--jobs must be >= 1, got {args.jobs}")
    prepare_iwslt14(args.orig_dir, args.out_dir, jobs=args.jobs)


def _add_s2t_command(commands: argparse._SubParsersAction) -> None:
    """The ``s2t`` subcommand: Kaldi data directories -> fairseq speech_to_text data."""
    s2t = commands.add_parser(
        "s2t",
        help="fbank features, manifests, vocabulary and config.yaml for fairseq's speech_to_text",
        formatter_class=_HelpFormatter,
        description="Turn Kaldi-style data directories into the input of fairseq's stock\n"
        "--task speech_to_text. Each DIR of --data-dirs holds three files:\n"
        "  wav.scp   <utt-id> <path of a mono WAV/FLAC/OGG file>   (any sample rate:\n"
        "            resampled to 16 kHz; relative paths start at the current directory;\n"
        "            piped commands such as 'sox ... - |' and segments files are NOT\n"
        "            supported)\n"
        "  text      <utt-id> <transcript>\n"
        "  utt2spk   <utt-id> <speaker>\n"
        "Written to --out-dir:\n"
        "  fbank80/<split>/<id>.npy  80-dim Kaldi fbank (25 ms window, 10 ms shift)\n"
        "  <split>.tsv               id, audio (.npy path), n_frames, tgt_text, speaker\n"
        "  global_cmvn.npz           mean/std of the training frames\n"
        "  spm_<unit><N>.model/.txt  sentencepiece model and fairseq vocabulary,\n"
        "                            trained on the training transcripts\n"
        "  config.yaml               for --config-yaml: CMVN everywhere, SpecAugment\n"
        "                            on the training split\n"
        "Only the training split is speed-perturbed (ids sp0.9-<id>, ...) and filtered\n"
        "by --max-frames; the others keep every utterance. A run that was interrupted\n"
        "continues where it stopped (existing features are reused). Paths in the .tsv\n"
        "files and config.yaml are absolute: after moving --out-dir, run again.",
        epilog="example (three splits, speed perturbation 0.9/1.0/1.1, 2 processes):\n"
        f"  {PROG} s2t --data-dirs train=data/train dev=data/dev test=data/test \\\n"
        "      --out-dir data/s2t --vocab-size 500 --unit unigram \\\n"
        "      --speed-perturb 0.9 1.0 1.1 --max-frames 3000 --jobs 2\n"
        "then train with the stock task:\n"
        "  fairseq-train data/s2t --task speech_to_text --config-yaml config.yaml \\\n"
        "      --train-subset train --valid-subset dev --user-dir user_dir ...",
    )
    s2t.add_argument(
        "--data-dirs", nargs="+", required=True, metavar="SPLIT=DIR",
        help="Kaldi data directories, each named by its split (the name of its .tsv)",
    )
    s2t.add_argument("--out-dir", type=Path, required=True, metavar="DIR", help="where to write the S2T data")
    s2t.add_argument(
        "--train-split", default="train", metavar="SPLIT",
        help="the split of --data-dirs to train on (its name must start with 'train')",
    )
    s2t.add_argument(
        "--vocab-size", type=int, default=500, metavar="N",
        help="sentencepiece vocabulary size (an upper limit on small corpora; unused for char)",
    )
    s2t.add_argument("--unit", choices=UNITS, default="unigram", help="sentencepiece model type")
    s2t.add_argument(
        "--speed-perturb", type=float, nargs="+", default=[1.0], metavar="FACTOR",
        help="speed factors of the training split, 1.0 included (Kaldi uses 0.9 1.0 1.1)",
    )
    s2t.add_argument(
        "--max-frames", type=int, default=DEFAULT_MAX_FRAMES, metavar="N",
        help="drop training utterances longer than N frames (10 ms each)",
    )
    s2t.add_argument(
        "--no-specaugment", action="store_true",
        help="leave SpecAugment out of config.yaml (it pays off only with longer training)",
    )
    s2t.add_argument("--jobs", type=int, default=1, metavar="N", help="feature extraction processes")
    s2t.add_argument(
        "--log-every", type=int, default=DEFAULT_LOG_EVERY, metavar="N",
        help="print progress every N utterances",
    )
    s2t.set_defaults(func=_run_s2t)


def _run_s2t(args: argparse.Namespace) -> None:
    data_dirs = {}
    for item in args.data_dirs:
        split, sep, directory = item.partition("=")
        if not sep or not split or not directory:
            raise CorpusError(f"--data-dirs takes SPLIT=DIR items such as train=data/train, got '{item}'")
        if split in data_dirs:
            raise CorpusError(f"--data-dirs names split '{split}' twice")
        data_dirs[split] = Path(directory)
    options = S2TOptions(
        train_split=args.train_split,
        vocab_size=args.vocab_size,
        unit=args.unit,
        speed_factors=tuple(args.speed_perturb),
        max_frames=args.max_frames,
        specaugment=not args.no_specaugment,
        jobs=args.jobs,
        log_every=args.log_every,
    )
    prepare_s2t(data_dirs, args.out_dir, options)


def _add_espeak_command(commands: argparse._SubParsersAction) -> None:
    """The ``espeak`` subcommand: an English ASR corpus synthesized by espeak-ng."""
    espeak = commands.add_parser(
        "espeak",
        help="English ASR corpus synthesized by espeak-ng from gettext sentences (offline)",
        formatter_class=_HelpFormatter,
        description="Read English sentences of the gettext de-en corpus aloud with espeak-ng voices\n"
        f"({len(espeak_corpus.ACCENTS)} accents x {len(espeak_corpus.VARIANTS)} variants, each with its own "
        "rate and pitch) and write\n16 kHz mono wavs plus Kaldi data directories train/, dev/, test/.\n\n"
        "Sentences are kept when espeak-ng reads them as written: no placeholders, paths,\n"
        "options, digits or identifiers, 3-20 words. Transcripts are lowercase words with\n"
        "apostrophes. No dev or test voice is heard in train; train utterances get white\n"
        "or pink noise at 10-30 dB SNR (unless --no-noise). A rerun resumes: valid wavs are kept.\n"
        "utterances.tsv records each utterance's voice, rate, pitch and noise.\n"
        "Needs espeak-ng: apt-get install espeak-ng",
        epilog="example:\n"
        f"  {PROG} espeak --out-dir data/espeak --num-utts 3000 --jobs 4\n"
        "  # writes data/espeak/{train,dev,test}/{wav.scp,text,utt2spk,spk2utt}, wavs\n"
        "  # under data/espeak/wav/",
    )
    espeak.add_argument(
        "--out-dir", type=Path, required=True, metavar="DIR", help="where to write the corpus"
    )
    espeak.add_argument(
        "--num-utts", type=int, default=espeak_corpus.DEFAULT_NUM_UTTS, metavar="N",
        help="utterances in all three splits",
    )
    espeak.add_argument(
        "--dev-fraction", type=float, default=espeak_corpus.DEFAULT_DEV_FRACTION, metavar="F",
        help="share of the sentences and of the voices that go to dev",
    )
    espeak.add_argument(
        "--test-fraction", type=float, default=espeak_corpus.DEFAULT_TEST_FRACTION, metavar="F",
        help="share of the sentences and of the voices that go to test",
    )
    espeak.add_argument(
        "--seed", type=int, default=espeak_corpus.DEFAULT_SEED, metavar="N",
        help="seed of the voice split, rates, pitches and noise",
    )
    espeak.add_argument(
        "--keep-clean", action="store_true",
        help="also write the train utterances without noise, as the Kaldi directory train_clean/",
    )
    espeak.add_argument(
        "--no-noise", action="store_true",
        help="leave the train utterances clean (short trainings learn much sooner without the noise)",
    )
    espeak.add_argument(
        "--jobs", type=int, default=1, metavar="N",
        help="parallel espeak-ng syntheses (the output does not depend on it)",
    )
    espeak.add_argument(
        "--locale-dir", type=Path, default=Path("/usr/share/locale"), metavar="DIR",
        help="root of the gettext catalogs",
    )
    espeak.add_argument(
        "--catalog-lang", default="de", metavar="LANG",
        help="catalog language whose gettext corpus gives the English sentences",
    )
    espeak.set_defaults(func=_run_espeak)


def _run_espeak(args: argparse.Namespace) -> None:
    espeak_corpus.build_espeak_corpus(
        out_dir=args.out_dir,
        num_utts=args.num_utts,
        dev_fraction=args.dev_fraction,
        test_fraction=args.test_fraction,
        seed=args.seed,
        keep_clean=args.keep_clean,
        noisy_train=not args.no_noise,
        jobs=args.jobs,
        locale_dir=args.locale_dir,
        catalog_lang=args.catalog_lang,
    )


def _add_aishell_command(commands: argparse._SubParsersAction) -> None:
    """The ``aishell`` subcommand: AISHELL-1 as Kaldi data directories."""
    aishell = commands.add_parser(
        "aishell",
        help="AISHELL-1 Mandarin ASR corpus as Kaldi data directories (character transcripts)",
        formatter_class=_HelpFormatter,
        description="Make Kaldi data directories train/, dev/, test/ from AISHELL-1 (OpenSLR 33).\n"
        "--aishell-dir is the data_aishell folder of data_aishell.tgz, with\n"
        f"  {TRANSCRIPT}\n"
        "  wav/{train,dev,test}/<speaker>/<utterance>.wav\n"
        "The per-speaker archives wav/*.tar.gz of the download are unpacked first (and\n"
        "deleted, as Kaldi does). Transcripts lose their word-separating spaces: the units\n"
        "are characters. Utterances lacking audio or transcript are dropped and counted.",
        epilog="example:\n"
        "  tar xzf data_aishell.tgz -C downloads\n"
        f"  {PROG} aishell --aishell-dir downloads/data_aishell --out-dir data/aishell\n"
        "  # about 120k/14k/7k train/dev/test utterances",
    )
    aishell.add_argument(
        "--aishell-dir", type=Path, required=True, metavar="DIR", help="the data_aishell folder"
    )
    aishell.add_argument(
        "--out-dir", type=Path, required=True, metavar="DIR",
        help="where to write the Kaldi data directories",
    )
    aishell.set_defaults(func=_run_aishell)


def _run_aishell(args: argparse.Namespace) -> None:
    prepare_aishell(args.aishell_dir, args.out_dir)


def _add_spm_command(commands: argparse._SubParsersAction) -> None:
    """The ``spm`` subcommand: train a sentencepiece model on text files, encode text files with it."""
    spm_command = commands.add_parser(
        "spm",
        help="train a sentencepiece model on text files; encode text files into pieces",
        formatter_class=_HelpFormatter,
        description="Subword units for the NMT recipes (fairseq's scripts/spm_*.py are not installed\n"
        "with the fairseq wheel). 'train' learns a model on plain text (one sentence a\n"
        "line; give both sides of a parallel corpus for a joint vocabulary); 'encode'\n"
        "writes each line of a text file as space-separated pieces (\u2581 marks a word\n"
        "start), the input of fairseq-preprocess. Normalisation is off, so\n"
        "'fairseq-generate --remove-bpe sentencepiece' gives back exactly the input text.",
        epilog="example (a joint BPE model of 10k pieces, then the test set encoded):\n"
        f"  {PROG} spm train --input data/train.de data/train.en \\\n"
        "      --model-prefix data/spm/spm --vocab-size 10000\n"
        f"  {PROG} spm encode --model data/spm/spm.model --input data/test.de \\\n"
        "      --output data/spm/test.de",
    )
    actions = spm_command.add_subparsers(dest="spm_action", required=True, metavar="action")
    train = actions.add_parser(
        "train", help="train PREFIX.model and PREFIX.vocab on text files", formatter_class=_HelpFormatter,
        description="Train a sentencepiece model on all lines of the --input files (every\n"
        "character kept: character_coverage 1.0; no normalisation).",
    )
    train.add_argument(
        "--input", type=Path, nargs="+", required=True, metavar="FILE",
        help="training text, one sentence a line",
    )
    train.add_argument(
        "--model-prefix", type=Path, required=True, metavar="PREFIX",
        help="writes PREFIX.model and PREFIX.vocab (folders are created)",
    )
    train.add_argument("--vocab-size", type=int, required=True, metavar="N", help="number of pieces")
    train.add_argument("--model-type", default="bpe", choices=MODEL_TYPES, help="sentencepiece model type")
    train.add_argument("--threads", type=int, default=1, metavar="N", help="trainer threads")
    train.set_defaults(func=_run_spm_train)
    encode = actions.add_parser(
        "encode", help="write a text file as space-separated pieces", formatter_class=_HelpFormatter,
        description="Encode every line of --input with --model; --output gets one line of\n"
        "space-separated pieces per input line.",
    )
    encode.add_argument("--model", type=Path, required=True, metavar="FILE", help="a .model file written by train")
    encode.add_argument("--input", type=Path, required=True, metavar="FILE", help="text, one sentence a line")
    encode.add_argument("--output", type=Path, required=True, metavar="FILE", help="where to write the pieces")
    encode.set_defaults(func=_run_spm_encode)


def _run_spm_train(args: argparse.Namespace) -> None:
    if args.vocab_size < 1 or args.threads < 1:
        raise CorpusError(f"--vocab-size and --threads must be >= 1, got {args.vocab_size} and {args.threads}")
    check_output_dir(args.model_prefix.parent, "--model-prefix")
    settings = SentencePieceSettings(
        model_type=args.model_type, vocab_size=args.vocab_size, normalization="identity", threads=args.threads
    )
    model = train_sentencepiece(args.model_prefix, settings, files=args.input)
    print(f"trained {model} ({args.model_type}, {args.vocab_size} pieces)", file=sys.stderr)


def _run_spm_encode(args: argparse.Namespace) -> None:
    check_output_dir(args.output.parent, "--output")
    lines = encode_file(args.model, args.input, args.output)
    print(f"encoded {args.input} -> {args.output}: {lines} lines", file=sys.stderr)


def check_output_dir(path: Path, option: str) -> None:
    """Raise :class:`CorpusError` unless ``path`` is a folder or can be created as one: neither it nor
    a parent of it may be an existing file."""
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                raise CorpusError(f"{option}: {folder} is an existing file; expected a folder")
            return


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``fairseq-accel-prepare`` and its subcommands."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Build the corpora that the fairseq_accel recipes train on: plain-text parallel\n"
        "corpora ({train,valid,test}.{src,tgt}, one sentence per line) and speech corpora\n"
        "(Kaldi data directories {train,dev,test}/{wav.scp,text,utt2spk,spk2utt}), and the\n"
        "subword units (sentencepiece) and speech features they need.",
        formatter_class=_HelpFormatter,
        epilog="examples:\n"
        f"  {PROG} gettext --out-dir data/l10n.de-en\n"
        f"  {PROG} iwslt14 --orig-dir downloads/de-en --out-dir data/iwslt\n"
        f"  {PROG} spm train --input data/iwslt/train.de data/iwslt/train.en \\\n"
        "      --model-prefix data/spm/spm --vocab-size 10000\n"
        f"run '{PROG} <command> --help' for the options of a command",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    _add_gettext_command(commands)
    _add_iwslt14_command(commands)
    _add_s2t_command(commands)
    _add_espeak_command(commands)
    _add_aishell_command(commands)
    _add_spm_command(commands)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); return the exit status.

    Problems with the input data or options are printed as one ``fairseq-accel-prepare: error:`` line
    and give exit status 2.
    """
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "out_dir", None) is not None:
            check_output_dir(args.out_dir, "--out-dir")
        args.func(args)
    except CorpusError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
