"""A parallel corpus from the machine's gettext catalogs: real human translations, no download.

Every ``<locale_dir>/<lang>/LC_MESSAGES/<domain>.mo`` maps the English messages of one program (msgid)
to their translation into ``<lang>`` (msgstr). Pooling all catalogs of one language gives tens of
thousands of (translation, English) pairs: short software messages, menu labels and help texts.

Pipeline (:func:`build_corpus`), each step printing its counts:

1. :func:`find_catalogs` -- the sorted ``*.mo`` files of the catalog language;
2. :func:`extract_pairs` -- msgid/msgstr pairs (plural entries: singular msgid with ``msgstr[0]``);
3. :func:`clean_pair` -- whitespace normalised, message contexts and accelerator markers removed;
4. :func:`filter_pairs` -- drop empty, untranslated, format-only, too short and too long pairs;
5. :func:`dedup_by_source` -- one target per source sentence, chosen deterministically;
6. :func:`split_pairs` -- train/valid/test by a stable hash of the source sentence;
7. :func:`write_splits` -- ``{train,valid,test}.{src,tgt}``, one sentence per line.

Every step is a pure function of its input and the output does not depend on dictionary or file-system
order, so two machines with the same catalogs produce byte-identical files.
"""
from __future__ import annotations

import gettext
import hashlib
import re
import struct
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Sequence, Tuple

from fairseq_accel.data.errors import CorpusError

# gettext msgids are the programs' original (English) messages.
MSGID_LANG = "en"
SPLITS = ("train", "valid", "test")
# About 1,000 valid and 1,200 test sentences from the ~39k German pairs of a Debian system.
DEFAULT_VALID_FRACTION = 0.026
DEFAULT_TEST_FRACTION = 0.032


class Pair(NamedTuple):
    """One sentence pair in translation direction (source, target)."""

    src: str
    tgt: str


@dataclass(frozen=True)
class FilterConfig:
    """Length limits of :func:`filter_pairs` (words are whitespace-separated tokens).

    A pair is too short when *neither* side reaches ``min_words``: single-word entries (language and
    region names, lone labels like "Warning") are mostly dictionary look-ups, but a two-word English
    label that German writes as one compound ("Save file" / "Speichern") is a real translation.
    A pair is too long when *either* side exceeds ``max_words`` or ``max_chars``: those are
    multi-paragraph help texts whose line breaks and alignment do not translate sentence by sentence.
    """

    min_words: int = 2
    max_words: int = 60
    max_chars: int = 400

    def validate(self) -> None:
        """Raise :class:`CorpusError` for limits that would reject every pair."""
        if self.min_words < 1:
            raise CorpusError(f"min_words must be >= 1, got {self.min_words}")
        if self.max_words < self.min_words:
            raise CorpusError(f"max_words ({self.max_words}) must be >= min_words ({self.min_words})")
        if self.max_chars < 1:
            raise CorpusError(f"max_chars must be >= 1, got {self.max_chars}")


# --------------------------------------------------------------------------------------------------
# 1. catalogs
# --------------------------------------------------------------------------------------------------
def catalog_dir(locale_dir: Path, lang: str) -> Path:
    """Where gettext keeps the catalogs of ``lang``."""
    return Path(locale_dir) / lang / "LC_MESSAGES"


def available_languages(locale_dir: Path) -> List[Tuple[str, int]]:
    """(language, number of catalogs) for every language with ``*.mo`` files, most catalogs first."""
    locale_dir = Path(locale_dir)
    if not locale_dir.is_dir():
        return []
    counts = []
    for lang_dir in locale_dir.iterdir():
        n = len(list(catalog_dir(locale_dir, lang_dir.name).glob("*.mo")))
        if n:
            counts.append((lang_dir.name, n))
    return sorted(counts, key=lambda item: (-item[1], item[0]))


def find_catalogs(locale_dir: Path, lang: str) -> List[Path]:
    """The ``*.mo`` catalogs of ``lang`` under ``locale_dir``, sorted by file name."""
    locale_dir = Path(locale_dir)
    if not locale_dir.is_dir():
        raise CorpusError(f"locale directory {locale_dir} does not exist")
    catalogs = sorted(catalog_dir(locale_dir, lang).glob("*.mo"))
    if not catalogs:
        available = available_languages(locale_dir)
        if available:
            listed = ", ".join(f"{name} ({n})" for name, n in available[:12])
            hint = f"languages with catalogs there (number of catalogs): {listed}"
            if len(available) > 12:
                hint += f", ... ({len(available)} languages in all)"
        else:
            hint = "no language there has any"
        raise CorpusError(
            f"no gettext catalogs for language '{lang}': {catalog_dir(locale_dir, lang)}/*.mo matches "
            f"nothing; {hint}"
        )
    return catalogs


# --------------------------------------------------------------------------------------------------
# 2. extraction
# --------------------------------------------------------------------------------------------------
def read_catalog(path: Path) -> List[Tuple[str, str]]:
    """(msgid, msgstr) entries of one ``.mo`` file, without the header entry.

    A plural entry contributes its singular msgid with the first translated form (``msgstr[0]``),
    which is the singular in German, French and most other languages. The message context
    (``msgctxt``) that gettext prefixes to the msgid is dropped.
    Raises ``OSError``, ``UnicodeDecodeError`` or ``struct.error`` for files Python's gettext cannot read.
    """
    with open(path, "rb") as fh:
        catalog = gettext.GNUTranslations(fh)._catalog
    entries = []
    for key, msgstr in catalog.items():
        if isinstance(key, tuple):
            msgid, form = key
            if form != 0:
                continue
        else:
            msgid = key
        if msgid == "":
            continue  # the header entry (metadata, not a message)
        entries.append((msgid.rsplit("\x04", 1)[-1], msgstr))
    return sorted(entries)


def extract_pairs(
    catalogs: Sequence[Path], catalog_lang_is_source: bool = True, log: Callable[[str], None] = print
) -> List[Pair]:
    """All entries of ``catalogs`` as sorted pairs, in translation direction.

    ``catalog_lang_is_source``: True gives (msgstr, msgid) pairs, i.e. catalog language -> English;
    False gives English -> catalog language. Catalogs that Python's gettext cannot read are skipped
    with a message: truncated files, or a non-UTF-8 header (Python decodes the header as UTF-8 before
    it learns the catalog's charset from it, which breaks e.g. Debian's Latin-1 net-tools.mo).
    """
    pairs = []
    for path in catalogs:
        try:
            entries = read_catalog(path)
        except (OSError, ValueError, struct.error) as err:  # ValueError includes UnicodeDecodeError
            log(f"skipping {path}: Python's gettext cannot read it ({type(err).__name__}: {err})")
            continue
        for msgid, msgstr in entries:
            pairs.append(Pair(msgstr, msgid) if catalog_lang_is_source else Pair(msgid, msgstr))
    return sorted(pairs)


# --------------------------------------------------------------------------------------------------
# 3. cleaning
# --------------------------------------------------------------------------------------------------
# gnupg annotates option help texts with the argument name, e.g. "|FILE|read options from FILE".
_ARGUMENT_ANNOTATION = re.compile(r"^\|[^|\s]*\|")
# A GTK ("_Open") or Qt/KDE ("&Open") accelerator marker: before a letter, and for "&" not an entity.
_ACCELERATOR = re.compile(r"_(?=[^\W\d_])|&(?=[^\W\d_])(?![^\W\d_]+;)")


def normalize_whitespace(text: str) -> str:
    """Collapse every run of whitespace (newlines, tabs, alignment) into one space; strip the ends."""
    return " ".join(text.split())


def _accelerator_word(text: str) -> Tuple[int, str]:
    """Position of the only accelerator marker in ``text`` and the word around it; (-1, "") unless
    there is exactly one."""
    markers = [m.start() for m in _ACCELERATOR.finditer(text)]
    if len(markers) != 1:
        return -1, ""
    pos = markers[0]
    start = text.rfind(" ", 0, pos) + 1
    end = text.find(" ", pos)
    return pos, text[start : end if end >= 0 else len(text)]


def strip_accelerators(src: str, tgt: str) -> Tuple[str, str]:
    """Remove menu-label accelerator markers (``_Save`` / ``&Save``) from both sides of a pair.

    A marker is only taken as an accelerator when each side has exactly one, the marked word of one
    side does not occur in the other (identifiers such as ``cache_set`` or ``AT&T`` are copied
    verbatim by translators) and at least one side puts it at the start of a word (as in
    ``Save _As`` / ``Speichern _unter``; ``new_version`` / ``neue_Version`` is a translated
    placeholder name, not a menu label).
    """
    src_pos, src_word = _accelerator_word(src)
    tgt_pos, tgt_word = _accelerator_word(tgt)
    if src_pos < 0 or tgt_pos < 0 or src_word in tgt or tgt_word in src:
        return src, tgt
    word_initial = any(
        pos == 0 or not text[pos - 1].isalnum() for text, pos in ((src, src_pos), (tgt, tgt_pos))
    )
    if not word_initial:
        return src, tgt
    return src[:src_pos] + src[src_pos + 1 :], tgt[:tgt_pos] + tgt[tgt_pos + 1 :]


def clean_pair(pair: Pair) -> Pair:
    """Normalise whitespace, drop gnupg ``|ARG|`` annotations and accelerator markers."""
    src = normalize_whitespace(_ARGUMENT_ANNOTATION.sub("", pair.src))
    tgt = normalize_whitespace(_ARGUMENT_ANNOTATION.sub("", pair.tgt))
    return Pair(*strip_accelerators(src, tgt))


# --------------------------------------------------------------------------------------------------
# 4. filters
# --------------------------------------------------------------------------------------------------
# printf conversions (%s, %5.2f, %1$s, %-10lu, %%), python named ones (%(name)s) and brace fields
# ({}, {0}, {name}, {0:>4}).
_PLACEHOLDER = re.compile(
    r"%(?:\(\w+\))?(?:\d+\$)?[-+ 0#']*(?:\d+|\*)?(?:\.(?:\d+|\*))?(?:hh|h|ll|l|L|q|j|z|t)?[a-zA-Z%]"
    r"|\{[^{}\s]*\}"
)


def is_format_only(text: str) -> bool:
    """True when ``text`` has no letter outside its format placeholders (e.g. ``"%s: %d%%"``)."""
    return not any(ch.isalpha() for ch in _PLACEHOLDER.sub("", text))


def _empty(pair: Pair, config: FilterConfig) -> bool:
    return not pair.src or not pair.tgt


def _untranslated(pair: Pair, config: FilterConfig) -> bool:
    return pair.src.casefold() == pair.tgt.casefold()


def _format_only(pair: Pair, config: FilterConfig) -> bool:
    return is_format_only(pair.src) or is_format_only(pair.tgt)


def _too_short(pair: Pair, config: FilterConfig) -> bool:
    return max(len(pair.src.split()), len(pair.tgt.split())) < config.min_words


def _too_long(pair: Pair, config: FilterConfig) -> bool:
    return any(len(text.split()) > config.max_words or len(text) > config.max_chars for text in pair)


# (name printed in the counts, predicate that *drops* a pair), applied in this order.
FILTERS: Tuple[Tuple[str, Callable[[Pair, FilterConfig], bool]], ...] = (
    ("empty", _empty),
    ("untranslated (source == target, ignoring case)", _untranslated),
    ("format-only (placeholders, digits, punctuation)", _format_only),
    ("too short", _too_short),
    ("too long", _too_long),
)


def filter_pairs(pairs: Sequence[Pair], config: FilterConfig) -> Tuple[List[Pair], List[Tuple[str, int]]]:
    """Apply :data:`FILTERS` in order; return the kept pairs and (filter, pairs left after it)."""
    config.validate()
    counts = []
    kept = list(pairs)
    for name, drop in FILTERS:
        kept = [pair for pair in kept if not drop(pair, config)]
        counts.append((name, len(kept)))
    return kept, counts


# --------------------------------------------------------------------------------------------------
# 5. dedup, 6. split, 7. write
# --------------------------------------------------------------------------------------------------
def dedup_by_source(pairs: Sequence[Pair]) -> List[Pair]:
    """One pair per source sentence: its most frequent target, ties broken by the smallest string.

    The same message occurs in several catalogs (gnulib, libc, ...); keeping one target per source
    means no source sentence can end up in two splits. Returns the pairs sorted.
    """
    targets: Dict[str, Counter] = defaultdict(Counter)
    for src, tgt in pairs:
        targets[src][tgt] += 1
    return sorted(
        Pair(src, min(counter, key=lambda tgt: (-counter[tgt], tgt))) for src, counter in targets.items()
    )


def stable_fraction(text: str) -> float:
    """A number in [0, 1) from the MD5 of ``text``: the same on every machine and Python version."""
    return int(hashlib.md5(text.encode("utf-8")).hexdigest()[:16], 16) / 2.0**64


def split_pairs(pairs: Sequence[Pair], valid_fraction: float, test_fraction: float) -> Dict[str, List[Pair]]:
    """Assign each pair to train/valid/test by :func:`stable_fraction` of its source sentence.

    A sentence's split depends on nothing but the sentence, so adding or removing catalogs never
    moves a sentence from test to train. Each split is ordered by the same hash (a fixed shuffle).
    """
    if valid_fraction < 0 or test_fraction < 0 or valid_fraction + test_fraction >= 1:
        raise CorpusError(
            f"valid and test fractions must be >= 0 and sum to < 1, got valid {valid_fraction} + "
            f"test {test_fraction}"
        )
    keyed = sorted((stable_fraction(pair.src), pair) for pair in pairs)
    splits: Dict[str, List[Pair]] = {name: [] for name in SPLITS}
    for fraction, pair in keyed:
        if fraction < test_fraction:
            splits["test"].append(pair)
        elif fraction < test_fraction + valid_fraction:
            splits["valid"].append(pair)
        else:
            splits["train"].append(pair)
    return splits


def write_splits(splits: Dict[str, List[Pair]], out_dir: Path, src_lang: str, tgt_lang: str) -> List[Path]:
    """Write ``{split}.{src_lang}`` and ``{split}.{tgt_lang}`` (UTF-8, one sentence per line)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, pairs in splits.items():
        for lang, side in ((src_lang, 0), (tgt_lang, 1)):
            path = out_dir / f"{name}.{lang}"
            path.write_text("".join(pair[side] + "\n" for pair in pairs), encoding="utf-8")
            written.append(path)
    return written


# --------------------------------------------------------------------------------------------------
# the whole pipeline
# --------------------------------------------------------------------------------------------------
def catalog_language(src_lang: str, tgt_lang: str) -> str:
    """The language whose catalogs are read: whichever side of the pair is not English."""
    if (src_lang == MSGID_LANG) == (tgt_lang == MSGID_LANG):
        raise CorpusError(
            f"exactly one of the source and target languages must be '{MSGID_LANG}' (gettext msgids are "
            f"English; the other side is the catalog language), got source '{src_lang}', target '{tgt_lang}'"
        )
    return tgt_lang if src_lang == MSGID_LANG else src_lang


def build_corpus(
    locale_dir: Path,
    out_dir: Path,
    src_lang: str = "de",
    tgt_lang: str = MSGID_LANG,
    valid_fraction: float = DEFAULT_VALID_FRACTION,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    filters: FilterConfig = FilterConfig(),
    log: Callable[[str], None] = print,
) -> Dict[str, int]:
    """Extract, clean, filter, dedup, split and write the corpus; return the count of every step.

    Raises :class:`CorpusError` when no catalog exists or nothing survives a step.
    """
    lang = catalog_language(src_lang, tgt_lang)
    filters.validate()
    catalogs = find_catalogs(locale_dir, lang)
    log(f"catalogs: {len(catalogs)} in {catalog_dir(locale_dir, lang)}")
    counts: Dict[str, int] = {"catalogs": len(catalogs)}

    pairs = extract_pairs(catalogs, catalog_lang_is_source=lang == src_lang, log=log)
    counts["raw pairs"] = len(pairs)
    log(f"raw pairs: {len(pairs)}")

    pairs, filter_counts = filter_pairs([clean_pair(pair) for pair in pairs], filters)
    for name, n in filter_counts:
        counts[f"after {name}"] = n
        log(f"after dropping {name}: {n}")

    pairs = dedup_by_source(pairs)
    counts["after dedup by source"] = len(pairs)
    log(f"after dedup by source: {len(pairs)}")

    summary = "; ".join(f"{name}: {n}" for name, n in counts.items())
    if not pairs:
        raise CorpusError(
            f"the {src_lang}-{tgt_lang} corpus from the '{lang}' catalogs in {locale_dir} is empty after "
            f"filtering ({summary}); lower --min-words or raise --max-words/--max-chars"
        )
    splits = split_pairs(pairs, valid_fraction, test_fraction)
    for name in SPLITS:
        counts[name] = len(splits[name])
        log(f"{name}: {len(splits[name])} pairs")
    empty = [name for name in SPLITS if not splits[name]]
    if empty:
        raise CorpusError(
            f"split(s) {', '.join(empty)} of the {src_lang}-{tgt_lang} corpus from {locale_dir} would be "
            f"empty ({summary}; train {counts['train']}, valid {counts['valid']}, test {counts['test']}); "
            f"raise --valid-fraction/--test-fraction or add catalogs"
        )
    written = write_splits(splits, out_dir, src_lang, tgt_lang)
    log(f"wrote {len(written)} files to {out_dir}")
    return counts
