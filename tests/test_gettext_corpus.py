"""The gettext parallel corpus: extraction, cleaning, filters, dedup, split, CLI and its errors."""
import struct
import subprocess
import sys
from pathlib import Path
from typing import List, Sequence, Tuple, Union

import pytest

from fairseq_accel.cli.prepare import main
from fairseq_accel.data.errors import CorpusError
from fairseq_accel.data.gettext_corpus import (
    FilterConfig,
    Pair,
    build_corpus,
    clean_pair,
    dedup_by_source,
    extract_pairs,
    filter_pairs,
    find_catalogs,
    is_format_only,
    read_catalog,
    split_pairs,
    stable_fraction,
    strip_accelerators,
)

REPO = Path(__file__).resolve().parents[1]
HEADER = "Content-Type: text/plain; charset={charset}\nPlural-Forms: nplurals=2; plural=(n != 1);\n"

# msgid: a string, "context\x04msgid", or (singular, plural) for a plural entry with a list of forms
Entry = Tuple[Union[str, Tuple[str, str]], Union[str, Sequence[str]]]


def write_mo(path: Path, entries: Sequence[Entry], charset: str = "UTF-8", header: bytes = b"") -> Path:
    """Write a GNU .mo catalog (little endian, no hash table) holding ``entries`` and a header."""
    items = [(b"", header or HEADER.format(charset=charset).encode("ascii"))]
    for msgid, msgstr in entries:
        if isinstance(msgid, tuple):
            key = msgid[0].encode(charset) + b"\0" + msgid[1].encode(charset)
            value = b"\0".join(form.encode(charset) for form in msgstr)
        else:
            key, value = msgid.encode(charset), msgstr.encode(charset)
        items.append((key, value))
    items.sort()
    n = len(items)
    keys_start = 28 + 16 * n  # after the 7-word header and the two (length, offset) tables
    values_start = keys_start + sum(len(key) + 1 for key, _ in items)
    key_table, value_table, offset = [], [], keys_start
    for key, _ in items:
        key_table.append((len(key), offset))
        offset += len(key) + 1
    offset = values_start
    for _, value in items:
        value_table.append((len(value), offset))
        offset += len(value) + 1
    data = struct.pack("<7I", 0x950412DE, 0, n, 28, 28 + 8 * n, 0, 0)
    data += b"".join(struct.pack("<2I", *pair) for pair in key_table + value_table)
    data += b"".join(key + b"\0" for key, _ in items) + b"".join(value + b"\0" for _, value in items)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def numbered_entries(start: int, count: int) -> List[Entry]:
    """Distinct, translatable (English msgid, German msgstr) messages."""
    numbers = range(start, start + count)
    return [(f"Saved {i} files to the archive", f"{i} Dateien im Archiv gespeichert") for i in numbers]


@pytest.fixture
def locale_dir(tmp_path) -> Path:
    """Two German catalogs and one French one, with every kind of entry the pipeline handles."""
    root = tmp_path / "locale"
    write_mo(
        root / "de" / "LC_MESSAGES" / "files.mo",
        numbered_entries(0, 60)
        + [
            ("Could not open the file", "Die Datei konnte nicht geöffnet werden"),
            ("menu\x04Open _Recent", "Zuletzt _geöffnet"),
            ("Save _As", "Speichern _unter"),
            (
                ("%d file was removed", "%d files were removed"),
                ["%d Datei wurde entfernt", "%d Dateien wurden entfernt"],
            ),
            ("  line one\n  line two  ", "Zeile eins\nZeile zwei"),
            ("Normal", "Normal"),
            ("%s: %s", "%s – %s"),
            ("Warning", "Warnung"),
            ("Save file", "Datei speichern"),
            ("Connection closed by the server", "Verbindung vom Server geschlossen"),
        ],
    )
    write_mo(
        root / "de" / "LC_MESSAGES" / "net.mo",
        [
            ("Connection closed by the server", "Verbindung vom Server beendet"),
            ("Connection timed out after a minute", "Zeitüberschreitung der Verbindung"),
            ("Save the file", "Datei speichern"),
        ],
    )
    write_mo(
        root / "fr" / "LC_MESSAGES" / "files.mo",
        [("Could not open the file", "Impossible d'ouvrir le fichier")],
    )
    return root


# --------------------------------------------------------------------------------------------------
# catalogs and extraction
# --------------------------------------------------------------------------------------------------
def test_read_catalog_plural_context_and_header(locale_dir):
    entries = dict(read_catalog(locale_dir / "de" / "LC_MESSAGES" / "files.mo"))
    assert "" not in entries  # the header
    assert entries["%d file was removed"] == "%d Datei wurde entfernt"  # msgstr[0] of a plural entry
    assert "%d files were removed" not in entries
    assert entries["Open _Recent"] == "Zuletzt _geöffnet"  # the msgctxt "menu" is dropped
    assert len(entries) == 70


def test_find_catalogs_sorted(locale_dir):
    assert [path.name for path in find_catalogs(locale_dir, "de")] == ["files.mo", "net.mo"]


def test_find_catalogs_unknown_language_lists_available(locale_dir):
    with pytest.raises(CorpusError) as err:
        find_catalogs(locale_dir, "nl")
    message = str(err.value)
    assert f"no gettext catalogs for language 'nl': {locale_dir}/nl/LC_MESSAGES/*.mo" in message
    assert "matches nothing" in message
    assert "de (2), fr (1)" in message


def test_find_catalogs_missing_locale_dir(tmp_path):
    with pytest.raises(CorpusError, match=f"locale directory {tmp_path / 'nope'} does not exist"):
        find_catalogs(tmp_path / "nope", "de")


def test_extract_pairs_direction_and_unreadable_catalog(locale_dir):
    catalogs = find_catalogs(locale_dir, "de")
    # a Latin-1 header that Python's gettext decodes as UTF-8 (as in Debian's net-tools.mo)
    broken = write_mo(
        locale_dir / "de" / "LC_MESSAGES" / "old.mo",
        [("Yes", "Ja")],
        header="Last-Translator: J\xfcrgen\n".encode("latin-1"),
    )
    truncated = locale_dir / "de" / "LC_MESSAGES" / "cut.mo"
    truncated.write_bytes(write_mo(truncated, [("Yes", "Ja")]).read_bytes()[:12])
    messages = []
    pairs = extract_pairs(catalogs + [broken, truncated], log=messages.append)
    assert Pair("Die Datei konnte nicht geöffnet werden", "Could not open the file") in pairs
    assert pairs == sorted(pairs)
    assert len(messages) == 2
    assert messages[0].startswith(f"skipping {broken}: Python's gettext cannot read it (UnicodeDecodeError")
    assert messages[1].startswith(f"skipping {truncated}: Python's gettext cannot read it")
    reverse = extract_pairs(catalogs, catalog_lang_is_source=False)
    assert sorted(Pair(tgt, src) for src, tgt in reverse) == pairs


# --------------------------------------------------------------------------------------------------
# cleaning and filters
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "src, tgt, expected",
    [
        ("_Öffnen", "_Open", ("Öffnen", "Open")),
        ("Speichern _unter", "Save _As", ("Speichern unter", "Save As")),
        ("An_wenden", "_Apply", ("Anwenden", "Apply")),  # one side word-initial is enough
        ("&Datei", "&File", ("Datei", "File")),
        # identifiers and entities are no accelerators
        ("cache_set: Fehler", "cache_set: failed", ("cache_set: Fehler", "cache_set: failed")),
        ("neue_Version", "new_version", ("neue_Version", "new_version")),
        ("AT&T-Syntax", "AT&T syntax", ("AT&T-Syntax", "AT&T syntax")),
        ("&amp; maskieren", "escape &amp;", ("&amp; maskieren", "escape &amp;")),
        ("_at_ oder _AT_", "_at_ or _AT_", ("_at_ oder _AT_", "_at_ or _AT_")),
    ],
)
def test_strip_accelerators(src, tgt, expected):
    assert strip_accelerators(src, tgt) == expected


def test_clean_pair_whitespace_and_annotations():
    assert clean_pair(Pair("  Zeile eins\n\tZeile  zwei ", "line one\nline two")) == Pair(
        "Zeile eins Zeile zwei", "line one line two"
    )
    assert clean_pair(Pair("|DATEI|Optionen aus DATEI lesen", "|FILE|read options from FILE")) == Pair(
        "Optionen aus DATEI lesen", "read options from FILE"
    )
    assert clean_pair(Pair("| <unbekannt>", "| <unknown>")) == Pair("| <unbekannt>", "| <unknown>")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("%s: %s", True),
        ("%1$s (%2$d%%)", True),
        ("%-10lu %5.2f", True),
        ("%(name)s / %(count)d", True),
        ("{0} -> {1}", True),
        ("{} ...", True),
        ("100%", True),
        ("%s files", False),
        ("Datei %s", False),
        ("{name} is invalid", False),
    ],
)
def test_is_format_only(text, expected):
    assert is_format_only(text) is expected


def test_each_filter_drops_its_pairs():
    pairs = [
        Pair("Datei gespeichert", "File saved"),  # kept
        Pair("", "Empty translation"),  # empty
        Pair("Normal mode", "normal MODE"),  # untranslated (case-insensitive)
        Pair("%s: %d", "%s: %d of %d"),  # format-only source
        Pair("Warnung", "Warning"),  # too short: both sides one word
        Pair("Speichern", "Save file"),  # kept: one side has two words
        Pair("wort " * 61, "word " * 10),  # too long: 61 words
        Pair("x" * 401 + " y", "many characters"),  # too long: 403 characters
    ]
    kept, counts = filter_pairs([clean_pair(pair) for pair in pairs], FilterConfig())
    assert kept == [Pair("Datei gespeichert", "File saved"), Pair("Speichern", "Save file")]
    assert [n for _, n in counts] == [7, 6, 5, 4, 2]
    assert [name for name, _ in counts][0] == "empty"


def test_filter_limits_are_validated():
    with pytest.raises(CorpusError, match=r"max_words \(1\) must be >= min_words \(2\)"):
        filter_pairs([], FilterConfig(max_words=1))


# --------------------------------------------------------------------------------------------------
# dedup and split
# --------------------------------------------------------------------------------------------------
def test_dedup_keeps_most_frequent_then_smallest_target():
    pairs = [Pair("Datei", "file"), Pair("Datei", "File"), Pair("Datei", "file")]
    pairs += [Pair("Ende", "end"), Pair("Ende", "End")]
    assert dedup_by_source(pairs) == [Pair("Datei", "file"), Pair("Ende", "End")]
    assert dedup_by_source(list(reversed(pairs))) == dedup_by_source(pairs)


def test_stable_fraction_is_fixed_md5():
    """The split key is the first 64 bits of the MD5 (not Python's per-process salted hash())."""
    assert stable_fraction("Datei gespeichert") == 0x435B10A1369AFD69 / 2.0**64


def test_split_is_deterministic_disjoint_and_stable():
    pairs = [Pair(f"Satz Nummer {i}", f"sentence number {i}") for i in range(2000)]
    splits = split_pairs(pairs, valid_fraction=0.1, test_fraction=0.2)
    assert splits == split_pairs(list(reversed(pairs)), 0.1, 0.2)
    sources = [{pair.src for pair in splits[name]} for name in ("train", "valid", "test")]
    assert sum(map(len, sources)) == len(pairs) and len(set.union(*sources)) == len(pairs)
    assert 150 <= len(splits["valid"]) <= 250 and 350 <= len(splits["test"]) <= 450
    # a sentence keeps its split when the corpus grows
    more = split_pairs(pairs + [Pair(f"Neuer Satz {i}", f"new sentence {i}") for i in range(500)], 0.1, 0.2)
    for name in ("train", "valid", "test"):
        assert set(splits[name]) <= set(more[name])


def test_split_fractions_are_checked():
    with pytest.raises(CorpusError, match="must be >= 0 and sum to < 1"):
        split_pairs([], valid_fraction=0.5, test_fraction=0.5)


# --------------------------------------------------------------------------------------------------
# the whole pipeline and the CLI
# --------------------------------------------------------------------------------------------------
def read_split(out_dir: Path, split: str, src: str = "de", tgt: str = "en") -> List[Tuple[str, str]]:
    src_lines = (out_dir / f"{split}.{src}").read_text(encoding="utf-8").split("\n")[:-1]
    tgt_lines = (out_dir / f"{split}.{tgt}").read_text(encoding="utf-8").split("\n")[:-1]
    assert len(src_lines) == len(tgt_lines)
    return list(zip(src_lines, tgt_lines))


def test_build_corpus_counts_and_files(locale_dir, tmp_path):
    messages = []
    counts = build_corpus(
        locale_dir, tmp_path / "out", valid_fraction=0.2, test_fraction=0.2, log=messages.append
    )
    assert counts["catalogs"] == 2
    assert counts["raw pairs"] == 73
    assert counts["after empty"] == 73
    assert counts["after untranslated (source == target, ignoring case)"] == 72  # "Normal"
    assert counts["after format-only (placeholders, digits, punctuation)"] == 71  # "%s: %s"
    assert counts["after too short"] == 70  # "Warning"
    assert counts["after too long"] == 70
    assert counts["after dedup by source"] == 69  # "Datei speichern": "Save file" or "Save the file"
    assert counts["train"] + counts["valid"] + counts["test"] == 69
    assert all(counts[name] > 0 for name in ("train", "valid", "test"))
    assert "raw pairs: 73" in messages and "after dedup by source: 69" in messages
    everything = sum((read_split(tmp_path / "out", name) for name in ("train", "valid", "test")), [])
    assert ("Zuletzt geöffnet", "Open Recent") in everything
    assert ("Speichern unter", "Save As") in everything
    assert ("Zeile eins Zeile zwei", "line one line two") in everything
    assert ("%d Datei wurde entfernt", "%d file was removed") in everything
    assert ("Verbindung vom Server geschlossen", "Connection closed by the server") in everything
    assert ("Verbindung vom Server beendet", "Connection closed by the server") in everything
    assert ("Datei speichern", "Save file") in everything  # same count: the smaller string wins


def test_cli_is_deterministic_and_supports_en_source(locale_dir, tmp_path):
    args = ["gettext", "--locale-dir", str(locale_dir), "--valid-fraction", "0.2", "--test-fraction", "0.2"]
    assert main(args + ["--out-dir", str(tmp_path / "a")]) == 0
    assert main(args + ["--out-dir", str(tmp_path / "b")]) == 0
    for name in ("train.de", "train.en", "valid.de", "valid.en", "test.de", "test.en"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert main(args + ["--out-dir", str(tmp_path / "en-de"), "--src-lang", "en", "--tgt-lang", "de"]) == 0
    en_de = sum((read_split(tmp_path / "en-de", name, "en", "de") for name in ("train", "valid", "test")), [])
    assert ("Could not open the file", "Die Datei konnte nicht geöffnet werden") in en_de
    # English source now: one of the two translations of the message is kept
    assert ("Connection closed by the server", "Verbindung vom Server beendet") in en_de
    assert ("Save file", "Datei speichern") in en_de and ("Save the file", "Datei speichern") in en_de


def test_cli_error_no_catalogs_for_language(locale_dir, tmp_path):
    """Run as a module: one error line, exit status 2, no traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "fairseq_accel.cli.prepare", "gettext", "--locale-dir", str(locale_dir),
         "--src-lang", "nl", "--out-dir", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=REPO,
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("fairseq-accel-prepare")]
    assert errors == [
        f"fairseq-accel-prepare: error: no gettext catalogs for language 'nl': "
        f"{locale_dir}/nl/LC_MESSAGES/*.mo matches nothing; "
        f"languages with catalogs there (number of catalogs): de (2), fr (1)"
    ]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_cli_error_empty_after_filtering(tmp_path, capsys):
    root = tmp_path / "locale"
    entries = [("Normal", "Normal"), ("%s: %s", "%s - %s"), ("Yes", "Ja")]
    write_mo(root / "de" / "LC_MESSAGES" / "x.mo", entries)
    assert main(["gettext", "--locale-dir", str(root), "--out-dir", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.startswith(
        f"fairseq-accel-prepare: error: the de-en corpus from the 'de' catalogs in {root} is empty"
    )
    assert "catalogs: 1; raw pairs: 3; after empty: 3; after untranslated" in error
    assert "after too short: 0" in error and "after dedup by source: 0" in error


@pytest.mark.parametrize(
    "args, message",
    [
        (["--src-lang", "de", "--tgt-lang", "fr"], "exactly one of the source and target languages must be"),
        (["--valid-fraction", "0.7", "--test-fraction", "0.4"], "must be >= 0 and sum to < 1"),
        (["--min-words", "0"], "min_words must be >= 1, got 0"),
        (["--valid-fraction", "0.0"], "split(s) valid of the de-en corpus"),
    ],
)
def test_cli_option_errors(locale_dir, tmp_path, capsys, args, message):
    assert main(["gettext", "--locale-dir", str(locale_dir), "--out-dir", str(tmp_path / "out")] + args) == 2
    error = capsys.readouterr().err
    assert error.startswith("fairseq-accel-prepare: error: ") and message in error


# --------------------------------------------------------------------------------------------------
# the real catalogs of this machine
# --------------------------------------------------------------------------------------------------
SYSTEM_LOCALE = Path("/usr/share/locale")


@pytest.mark.skipif(
    len(list((SYSTEM_LOCALE / "de" / "LC_MESSAGES").glob("*.mo"))) < 20,
    reason="needs >= 20 German gettext catalogs in /usr/share/locale/de/LC_MESSAGES: make system-deps",
)
def test_real_german_catalogs(tmp_path):
    counts = build_corpus(SYSTEM_LOCALE, tmp_path, log=lambda message: None)
    assert counts["train"] > 5000
    assert counts["valid"] > 100 and counts["test"] > 100
    splits = {name: read_split(tmp_path, name) for name in ("train", "valid", "test")}
    sources = {name: {src for src, _ in pairs} for name, pairs in splits.items()}
    assert not sources["train"] & sources["valid"]
    assert not sources["train"] & sources["test"]
    assert not sources["valid"] & sources["test"]
    for pairs in splits.values():
        assert all(src and tgt and src != tgt for src, tgt in pairs)
