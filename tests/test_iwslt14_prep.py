"""IWSLT'14 de-en preparation (prepare-iwslt14.sh conventions) on a small fixture in the real formats,
and stages 0-3 of egs/iwslt14/nmt/run.sh on it."""
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

pytest.importorskip("sacremoses", reason="sacremoses is not installed: pip install sacremoses (make venv)")

from fairseq_accel.cli.prepare import main  # noqa: E402
from fairseq_accel.data.errors import CorpusError  # noqa: E402
from fairseq_accel.data.iwslt14 import (  # noqa: E402
    TEST_SETS,
    check_orig_dir,
    clean_corpus,
    expected_files,
    prepare_iwslt14,
    read_xml_segments,
    split_train_valid,
    strip_train_metadata,
    tokenize,
)

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "iwslt14" / "de-en"
# cleaned training lines 23 and 46 of the fixture
VALID_EN = ["but the bees themselves are in danger .", "it sounds simple , but it &apos;s hard ."]


def lines(path: Path):
    return path.read_text(encoding="utf-8").split("\n")[:-1]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("iwslt14")
    counts = prepare_iwslt14(FIXTURE, out, log=lambda message: None)
    return out, counts


# --------------------------------------------------------------------------------------------------
# single steps
# --------------------------------------------------------------------------------------------------
def test_strip_train_metadata():
    raw = [
        "<url>http://www.ted.com/talks/x.html</url>",
        "<keywords>talks, science</keywords>",
        "<talkid>1</talkid>",
        "<title>Anna Berger: What bees know</title>",
        "<description>TED Talk Subtitles and Transcript: Bees count.</description>",
        "Bees can count.",
    ]
    assert strip_train_metadata(raw) == [
        "Anna Berger: What bees know",
        "TED Talk Subtitles and Transcript: Bees count.",
        "Bees can count.",
    ]


def test_read_xml_segments_strips_tags_and_curly_apostrophe():
    segments = read_xml_segments(FIXTURE / "IWSLT14.TED.tst2010.de-en.en.xml")
    assert segments == [
        "I'm going to show you a short video now.",
        "Pay attention to the colors.",
        "Do you see the difference?",
    ]


def test_tokenize_matches_tokenizer_perl_defaults():
    # escaping on (&apos; &quot;), no aggressive hyphen splitting, German abbreviations kept
    assert tokenize(['It\'s a "well-known" fact, e.g. here.'], "en") == [
        "It &apos;s a &quot; well-known &quot; fact , e.g. here ."
    ]
    assert tokenize(["Das ist z.B. 3,5 Mio. wert."], "de") == ["Das ist z.B. 3,5 Mio. wert ."]


def test_tokenize_jobs_do_not_change_output():
    text = [f"Satz {i}: Das ist's, oder?" for i in range(50)]
    assert tokenize(text, "de", jobs=2, chunk_size=7) == tokenize(text, "de")


def test_clean_corpus_semantics():
    pairs = clean_corpus(
        ["a b", "", "a", "a b c", "x y", "w " * 176, "a " * 175],
        ["c d", "e", "b c", "d e", "z", "w " * 176, "b " * 175],
    )
    # dropped: an empty side, ratio 2 (both directions), 176 tokens; kept: ratio exactly 1.5, 175 tokens
    assert pairs == [("a b", "c d"), ("a b c", "d e"), (" ".join(["a"] * 175), " ".join(["b"] * 175))]
    assert clean_corpus([" x \t y "], ["z  w "]) == [("x y", "z w")]  # whitespace normalised


def test_split_train_valid_every_23rd():
    pairs = [(str(n), str(n)) for n in range(1, 70)]
    train, valid = split_train_valid(pairs)
    assert [int(src) for src, _ in valid] == [23, 46, 69]
    assert len(train) == 66 and ("23", "23") not in train


# --------------------------------------------------------------------------------------------------
# the whole preparation on the fixture
# --------------------------------------------------------------------------------------------------
def test_prepare_counts_and_cleaning(prepared):
    out, counts = prepared
    # 57 lines per side, 6 metadata lines dropped = 51 pairs; clean drops "Danke ." (ratio 8),
    # "Vielen Dank ." (3 vs 5 tokens), the empty German line and the 188-token line: 47 pairs
    assert counts == {"train": 45, "valid": 2, "test": 13}
    for split in ("train", "valid", "test"):
        assert len(lines(out / f"{split}.de")) == len(lines(out / f"{split}.en")) == counts[split]
    train_de = lines(out / "train.de")
    assert train_de[0] == "anna berger : was bienen über zahlen wissen"  # <title> text kept, lowercased
    assert not any("<" in line or "danke ." == line or "vielen dank ." == line for line in train_de)
    assert "bees aren &apos;t just busy , they &apos;re also surprisingly smart ." in lines(out / "train.en")
    for split in ("train", "valid", "test"):
        assert all(line == line.lower() for line in lines(out / f"{split}.en"))


def test_prepare_valid_is_every_23rd_cleaned_line(prepared):
    out, _ = prepared
    assert lines(out / "valid.de") == [
        "aber die bienen selbst sind in gefahr .",  # cleaned line 23
        "es klingt einfach , aber es ist schwer .",  # cleaned line 46
    ]
    assert lines(out / "valid.en") == VALID_EN


def test_prepare_test_order_and_processing(prepared):
    out, _ = prepared
    expected_en = []
    for name in TEST_SETS:
        segments = read_xml_segments(FIXTURE / f"{name}.en.xml")
        expected_en += [line.lower() for line in tokenize(segments, "en")]
    assert lines(out / "test.en") == expected_en
    assert lines(out / "test.en")[:4] == [
        "when i was a child , i wanted to be an astronaut .",  # dev2010
        "my parents just laughed .",
        "today i work at a space agency .",
        "water is our city &apos;s most important resource .",  # TEDX.dev2012, ’ replaced by '
    ]
    # the last segment of tst2012
    assert lines(out / "test.de")[-1] == "sie hat nie lesen gelernt , aber sie wusste alles über pflanzen ."


def test_prepare_is_reproducible(prepared, tmp_path):
    out, _ = prepared
    prepare_iwslt14(FIXTURE, tmp_path, jobs=2, log=lambda message: None)
    for name in ("train.de", "train.en", "valid.de", "valid.en", "test.de", "test.en"):
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes()


# --------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------
def copy_fixture(tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURE, tmp_path / "de-en"))


def test_missing_file_lists_expected_and_present(tmp_path):
    orig = copy_fixture(tmp_path)
    (orig / "IWSLT14.TED.tst2011.de-en.en.xml").unlink()
    with pytest.raises(CorpusError) as err:
        check_orig_dir(orig)
    message = str(err.value)
    assert f"IWSLT'14 folder {orig} lacks 1 of the {len(expected_files())} expected files" in message
    assert "missing IWSLT14.TED.tst2011.de-en.en.xml; present: IWSLT14.TED.dev2010.de-en.de.xml" in message


def test_missing_folder(tmp_path):
    with pytest.raises(CorpusError, match=f"IWSLT'14 folder {tmp_path / 'nope'} does not exist"):
        check_orig_dir(tmp_path / "nope")


def test_train_line_count_mismatch(tmp_path):
    orig = copy_fixture(tmp_path)
    path = orig / "train.tags.de-en.en"
    path.write_text("".join(line + "\n" for line in lines(path)[:-1]), encoding="utf-8")
    with pytest.raises(CorpusError, match="train.tags.de-en.de has 57 lines but train.tags.de-en.en has 56"):
        prepare_iwslt14(orig, tmp_path / "out", log=lambda message: None)


def test_xml_segment_count_mismatch(tmp_path):
    orig = copy_fixture(tmp_path)
    path = orig / "IWSLT14.TED.tst2012.de-en.de.xml"
    kept = [line for line in lines(path) if '<seg id="2">' not in line]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    with pytest.raises(CorpusError) as err:
        prepare_iwslt14(orig, tmp_path / "out", log=lambda message: None)
    assert str(err.value).startswith(
        "IWSLT14.TED.tst2012.de-en.de.xml (<seg> lines) has 2 lines but IWSLT14.TED.tst2012.de-en.en.xml "
        "(<seg> lines) has 3"
    )


def test_cli_error_exit_status(tmp_path, capsys):
    assert main(["iwslt14", "--orig-dir", str(tmp_path), "--out-dir", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"fairseq-accel-prepare: error: IWSLT'14 folder {tmp_path} lacks 12 of the 12")
    assert error.count("\n") == 1


# --------------------------------------------------------------------------------------------------
# the recipe, stages 0-3 (no download: a local de-en.tgz)
# --------------------------------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed: apt-get install bash")
def test_recipe_stages_0_to_3(tmp_path):
    tgz = tmp_path / "de-en.tgz"
    with tarfile.open(tgz, "w:gz") as archive:
        archive.add(FIXTURE, arcname="de-en")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    command = [
        "bash", str(REPO / "egs" / "iwslt14" / "nmt" / "run.sh"),
        "--stage", "0", "--stop-stage", "3", "--orig_tgz", str(tgz), "--bpe_vocab_size", "200", "--nj", "1",
    ]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    data = tmp_path / "data"
    assert lines(data / "tok" / "valid.en") == VALID_EN
    # sentencepiece pieces decode back to the tokenized text (what --remove-bpe sentencepiece does)
    pieces = lines(data / "spm_bpe200" / "test.en")
    decoded = [line.replace(" ", "").replace("\u2581", " ").strip() for line in pieces]
    assert decoded == lines(data / "tok" / "test.en")
    for split in ("train", "valid", "test"):
        for lang in ("de", "en"):
            assert (data / "bin_bpe200" / f"{split}.de-en.{lang}.bin").is_file()
    assert (data / "bin_bpe200" / "dict.de.txt").is_file() and (data / "bin_bpe200" / "dict.en.txt").is_file()
    # finished stages are skipped on a rerun
    rerun = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert rerun.stderr.count("already done") == 3
