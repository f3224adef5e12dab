"""IWSLT'14 German-English, prepared the way fairseq's ``examples/translation/prepare-iwslt14.sh`` does.

That script (also ``configs/iwslt14.de-en/prepare.sh`` of the Lite Transformer repository) defines the
benchmark behind published IWSLT'14 de-en BLEU scores; this module reproduces its text processing in
Python, with ``sacremoses`` in place of the Moses perl scripts:

* train (``train.tags.de-en.{de,en}``): drop the ``<url>``, ``<talkid>`` and ``<keywords>`` lines, remove
  the ``<title>``/``<description>`` tags (their text stays, as in the reference), Moses-tokenize,
  clean like ``clean-corpus-n.perl -ratio 1.5 ... 1 175``, lowercase;
* valid: every 23rd line of that (1-based line numbers 23, 46, ...); train is the rest;
* test: the ``<seg id>`` lines of dev2010, TEDX.dev2012, tst2010, tst2011 and tst2012, concatenated in
  that order, tags and surrounding whitespace removed, ``’`` replaced by ``'``, tokenized, lowercased.

Tokenization matches ``tokenizer.perl -l <lang>`` with its defaults, which is what the reference runs:
no aggressive hyphen splitting, and XML escaping *on* (``it 's`` is written ``it &apos;s``), so the
output and BLEU scores are comparable with fairseq's data. BPE and binarization are left to the recipe
(``egs/iwslt14/nmt/run.sh``).
"""
from __future__ import annotations

import multiprocessing
import re
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

from fairseq_accel.data.errors import CorpusError

SRC_LANG, TGT_LANG = "de", "en"
LANG_PAIR = f"{SRC_LANG}-{TGT_LANG}"
TRAIN_PREFIX = f"train.tags.{LANG_PAIR}"
# The test set is these sets concatenated, in this order.
TEST_SETS = (
    f"IWSLT14.TED.dev2010.{LANG_PAIR}",
    f"IWSLT14.TEDX.dev2012.{LANG_PAIR}",
    f"IWSLT14.TED.tst2010.{LANG_PAIR}",
    f"IWSLT14.TED.tst2011.{LANG_PAIR}",
    f"IWSLT14.TED.tst2012.{LANG_PAIR}",
)
VALID_EVERY = 23  # line n of the cleaned training data (1-based) goes to valid when n % 23 == 0

# clean-corpus-n.perl settings of the reference
CLEAN_RATIO = 1.5
CLEAN_MIN_TOKENS = 1
CLEAN_MAX_TOKENS = 175
CLEAN_MAX_WORD_CHARS = 1000  # clean-corpus-n.perl's built-in --max-word-length

_DROPPED_TRAIN_TAGS = ("<url>", "<talkid>", "<keywords>")
_STRIPPED_TRAIN_TAGS = ("<title>", "</title>", "<description>", "</description>")
_SEG_OPEN = re.compile(r'<seg id="[0-9]*">\s*')
_SEG_CLOSE = re.compile(r"\s*</seg>\s*")


def expected_files() -> List[str]:
    """The files of the extracted ``de-en.tgz`` that the preparation reads."""
    names = [f"{TRAIN_PREFIX}.{lang}" for lang in (SRC_LANG, TGT_LANG)]
    names += [f"{name}.{lang}.xml" for name in TEST_SETS for lang in (SRC_LANG, TGT_LANG)]
    return names


def check_orig_dir(orig_dir: Path) -> None:
    """Raise :class:`CorpusError` naming the missing and the present files unless all inputs exist."""
    orig_dir = Path(orig_dir)
    if not orig_dir.is_dir():
        raise CorpusError(
            f"IWSLT'14 folder {orig_dir} does not exist; it is the '{LANG_PAIR}' folder extracted from "
            f"de-en.tgz and must hold {', '.join(expected_files())}"
        )
    missing = [name for name in expected_files() if not (orig_dir / name).is_file()]
    if missing:
        present = sorted(path.name for path in orig_dir.iterdir())
        raise CorpusError(
            f"IWSLT'14 folder {orig_dir} lacks {len(missing)} of the {len(expected_files())} expected files: "
            f"missing {', '.join(missing)}; present: {', '.join(present) or 'nothing'}"
        )


def _read_lines(path: Path) -> List[str]:
    with open(path, encoding="utf-8", newline="\n") as fh:
        return [line.rstrip("\n") for line in fh]


def strip_train_metadata(lines: Sequence[str]) -> List[str]:
    """Drop the ``<url>``/``<talkid>``/``<keywords>`` lines of a ``train.tags`` file and remove the
    title/description tags (keeping their text, as the reference does)."""
    kept = []
    for line in lines:
        if any(tag in line for tag in _DROPPED_TRAIN_TAGS):
            continue
        for tag in _STRIPPED_TRAIN_TAGS:
            line = line.replace(tag, "")
        kept.append(line)
    return kept


def read_xml_segments(path: Path) -> List[str]:
    """The text of every ``<seg id="N">`` line of an IWSLT xml file, with ``’`` replaced by ``'``."""
    segments = []
    for line in _read_lines(path):
        if "<seg id" not in line:
            continue
        line = _SEG_CLOSE.sub("", _SEG_OPEN.sub("", line))
        segments.append(line.replace("\u2019", "'"))
    return segments


def check_parallel(src_name: str, src_lines: Sequence[str], tgt_name: str, tgt_lines: Sequence[str]) -> None:
    """Raise :class:`CorpusError` when the two sides of a parallel file pair differ in length."""
    if len(src_lines) != len(tgt_lines):
        raise CorpusError(
            f"{src_name} has {len(src_lines)} lines but {tgt_name} has {len(tgt_lines)}; the two sides of "
            f"a parallel corpus must align line by line"
        )


# --------------------------------------------------------------------------------------------------
# tokenization (sacremoses, optionally in worker processes)
# --------------------------------------------------------------------------------------------------
_worker_tokenizer = None


def _moses_tokenizer(lang: str):
    try:
        from sacremoses import MosesTokenizer
    except ImportError as err:
        raise CorpusError(
            "IWSLT'14 preparation needs sacremoses (Moses tokenizer): pip install sacremoses "
            "(or pip install 'fairseq_accel[iwslt]')"
        ) from err
    return MosesTokenizer(lang=lang)


def _init_worker(lang: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = _moses_tokenizer(lang)


def _tokenize_with(tokenizer, lines: Sequence[str]) -> List[str]:
    # tokenizer.perl defaults: no -a (aggressive hyphen splitting), escaping on (no -no-escape)
    return [
        tokenizer.tokenize(line, aggressive_dash_splits=False, escape=True, return_str=True) for line in lines
    ]


def _tokenize_chunk(lines: Sequence[str]) -> List[str]:
    return _tokenize_with(_worker_tokenizer, lines)


def tokenize(lines: Sequence[str], lang: str, jobs: int = 1, chunk_size: int = 2000) -> List[str]:
    """Moses-tokenize ``lines`` like ``tokenizer.perl -l lang``; ``jobs`` > 1 uses worker processes.

    The output (order included) does not depend on ``jobs``.
    """
    if jobs <= 1 or len(lines) <= chunk_size:
        return _tokenize_with(_moses_tokenizer(lang), lines)
    chunks = [lines[i : i + chunk_size] for i in range(0, len(lines), chunk_size)]
    with multiprocessing.Pool(jobs, initializer=_init_worker, initargs=(lang,)) as pool:
        return [line for chunk in pool.map(_tokenize_chunk, chunks) for line in chunk]


# --------------------------------------------------------------------------------------------------
# cleaning and splitting
# --------------------------------------------------------------------------------------------------
def clean_corpus(
    src_lines: Sequence[str],
    tgt_lines: Sequence[str],
    ratio: float = CLEAN_RATIO,
    min_tokens: int = CLEAN_MIN_TOKENS,
    max_tokens: int = CLEAN_MAX_TOKENS,
) -> List[Tuple[str, str]]:
    """Keep the pairs ``clean-corpus-n.perl -ratio R corpus de en out MIN MAX`` keeps.

    Whitespace is normalised; a pair is dropped when a side is empty, has fewer than ``min_tokens`` or
    more than ``max_tokens`` tokens, a token longer than 1000 characters, or when one side has more
    than ``ratio`` times the tokens of the other. (The perl script also deletes ``|``; tokenization
    with escaping has already turned every ``|`` into ``&#124;``.)
    """
    check_parallel("source side", src_lines, "target side", tgt_lines)
    kept = []
    for src, tgt in zip(src_lines, tgt_lines):
        src_tokens, tgt_tokens = src.split(), tgt.split()
        n_src, n_tgt = len(src_tokens), len(tgt_tokens)
        if not (min_tokens <= n_src <= max_tokens and min_tokens <= n_tgt <= max_tokens):
            continue
        if n_src / n_tgt > ratio or n_tgt / n_src > ratio:
            continue
        if any(len(token) > CLEAN_MAX_WORD_CHARS for token in src_tokens + tgt_tokens):
            continue
        kept.append((" ".join(src_tokens), " ".join(tgt_tokens)))
    return kept


def lowercase(lines: Sequence[str]) -> List[str]:
    """Lowercase like Moses ``lowercase.perl`` (Unicode-aware)."""
    return [line.lower() for line in lines]


def split_train_valid(pairs: Sequence[Tuple[str, str]], every: int = VALID_EVERY) -> Tuple[list, list]:
    """(train, valid): valid takes 1-based lines ``every``, ``2*every``, ...; train the rest."""
    train = [pair for n, pair in enumerate(pairs, start=1) if n % every != 0]
    valid = [pair for n, pair in enumerate(pairs, start=1) if n % every == 0]
    return train, valid


# --------------------------------------------------------------------------------------------------
# the whole preparation
# --------------------------------------------------------------------------------------------------
def _tokenize_logged(
    lines: Sequence[str], lang: str, what: str, jobs: int, log: Callable[[str], None]
) -> List[str]:
    start = time.perf_counter()
    tokenized = tokenize(lines, lang, jobs)
    log(f"  tokenized {what}: {len(lines)} lines in {time.perf_counter() - start:.1f} s")
    return tokenized


def _write(path: Path, lines: Sequence[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def prepare_train_valid(
    orig_dir: Path, jobs: int = 1, log: Callable[[str], None] = print
) -> Tuple[List[Tuple[str, str]], List[Tuple[str, str]]]:
    """Tokenized, cleaned, lowercased (train, valid) pairs from ``train.tags.de-en.*``."""
    orig_dir = Path(orig_dir)
    names = {lang: f"{TRAIN_PREFIX}.{lang}" for lang in (SRC_LANG, TGT_LANG)}
    raw = {lang: _read_lines(orig_dir / name) for lang, name in names.items()}
    text = {lang: strip_train_metadata(lines) for lang, lines in raw.items()}
    for lang, name in names.items():
        log(f"{name}: {len(raw[lang])} lines, {len(text[lang])} without <url>/<talkid>/<keywords> lines")
    check_parallel(names[SRC_LANG], raw[SRC_LANG], names[TGT_LANG], raw[TGT_LANG])
    check_parallel(
        f"{names[SRC_LANG]} without metadata lines", text[SRC_LANG],
        f"{names[TGT_LANG]} without metadata lines", text[TGT_LANG],
    )
    tokenized = {lang: _tokenize_logged(text[lang], lang, names[lang], jobs, log) for lang in text}
    pairs = clean_corpus(tokenized[SRC_LANG], tokenized[TGT_LANG])
    log(
        f"clean (ratio {CLEAN_RATIO}, {CLEAN_MIN_TOKENS}-{CLEAN_MAX_TOKENS} tokens): "
        f"{len(tokenized[SRC_LANG])} pairs in, {len(pairs)} kept"
    )
    pairs = list(zip(lowercase([src for src, _ in pairs]), lowercase([tgt for _, tgt in pairs])))
    return split_train_valid(pairs)


def prepare_test(orig_dir: Path, jobs: int = 1, log: Callable[[str], None] = print) -> List[Tuple[str, str]]:
    """Tokenized, lowercased test pairs: :data:`TEST_SETS` concatenated in order."""
    orig_dir = Path(orig_dir)
    segments: Dict[str, List[str]] = {SRC_LANG: [], TGT_LANG: []}
    for name in TEST_SETS:
        per_lang = {}
        for lang in (SRC_LANG, TGT_LANG):
            path = orig_dir / f"{name}.{lang}.xml"
            per_lang[lang] = read_xml_segments(path)
            log(f"{path.name}: {len(per_lang[lang])} segments")
        check_parallel(
            f"{name}.{SRC_LANG}.xml (<seg> lines)", per_lang[SRC_LANG],
            f"{name}.{TGT_LANG}.xml (<seg> lines)", per_lang[TGT_LANG],
        )
        for lang in (SRC_LANG, TGT_LANG):
            segments[lang] += per_lang[lang]
    lowered = {
        lang: lowercase(_tokenize_logged(lines, lang, f"test segments ({lang})", jobs, log))
        for lang, lines in segments.items()
    }
    return list(zip(lowered[SRC_LANG], lowered[TGT_LANG]))


def prepare_iwslt14(
    orig_dir: Path, out_dir: Path, jobs: int = 1, log: Callable[[str], None] = print
) -> Dict[str, int]:
    """Write ``{train,valid,test}.{de,en}`` to ``out_dir`` from the extracted ``de-en`` folder.

    Returns the number of sentence pairs per split. A pure function of the input files: rerunning it
    rewrites identical outputs.
    """
    check_orig_dir(orig_dir)
    train, valid = prepare_train_valid(orig_dir, jobs, log)
    test = prepare_test(orig_dir, jobs, log)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, pairs in (("train", train), ("valid", valid), ("test", test)):
        for lang, side in ((SRC_LANG, 0), (TGT_LANG, 1)):
            _write(out_dir / f"{split}.{lang}", [pair[side] for pair in pairs])
        counts[split] = len(pairs)
        log(f"{split}: {len(pairs)} pairs -> {out_dir}/{split}.{{{SRC_LANG},{TGT_LANG}}}")
    return counts
