"""AISHELL-1 preparation on a fixture in the real layout.

The transcript fixture has the real file name and format (its lines are the corpus's own, except the
word segmentation of S0003W0134). The wavs are written by the tests into a temporary copy, 0.2 s of
16 kHz tone each, either unpacked or packed per speaker into ``wav/<speaker>.tar.gz`` as downloaded.
"""
import shutil
import tarfile
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import soundfile as sf

from fairseq_accel.cli.prepare import main
from fairseq_accel.data.errors import CorpusError
from fairseq_accel.data.aishell import (
    TRANSCRIPT,
    extract_speaker_archives,
    prepare_aishell,
    read_transcripts,
)

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "aishell" / "data_aishell"
# wav/<split>/<speaker>/<utterance>.wav written by the tests: every transcript id except S0002W0126 and
# S0724W0123 (transcripts without audio), plus S0003W0135 (audio without a transcript).
WAVS = {
    "train": ["BAC009S0002W0122", "BAC009S0002W0123", "BAC009S0002W0124", "BAC009S0002W0125",
              "BAC009S0002W0127", "BAC009S0003W0134", "BAC009S0003W0135"],
    "dev": ["BAC009S0724W0121", "BAC009S0724W0122"],
    "test": ["BAC009S0764W0121", "BAC009S0764W0122"],
}
NO_AUDIO = ["BAC009S0002W0126", "BAC009S0724W0123"]


def lines(path: Path) -> List[str]:
    return path.read_text(encoding="utf-8").splitlines()


def make_corpus(root: Path, wavs: Dict[str, List[str]] = WAVS, packed: bool = False) -> Path:
    """A data_aishell folder under ``root``: the fixture transcript and 0.2 s wavs; with ``packed`` the
    wavs of each speaker are in ``wav/<speaker>.tar.gz`` (members ``<split>/<speaker>/<utt>.wav``)."""
    corpus = root / "data_aishell"
    shutil.copytree(FIXTURE, corpus)
    tone = (0.1 * np.sin(2 * np.pi * 440 * np.arange(3200) / 16000)).astype(np.float32)
    for split, utt_ids in wavs.items():
        for utt_id in utt_ids:
            path = corpus / "wav" / split / utt_id[6:11] / f"{utt_id}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(str(path), tone, 16000, subtype="PCM_16")
    if packed:
        for split_dir in sorted((corpus / "wav").iterdir()):
            for speaker_dir in sorted(split_dir.iterdir()):
                with tarfile.open(corpus / "wav" / f"{speaker_dir.name}.tar.gz", "w:gz") as archive:
                    archive.add(speaker_dir, arcname=f"{split_dir.name}/{speaker_dir.name}")
            shutil.rmtree(split_dir)
    return corpus


def prepare(corpus: Path, out: Path):
    messages, warnings = [], []
    counts = prepare_aishell(corpus, out, log=messages.append, warn=warnings.append)
    return counts, messages, warnings


def test_read_transcripts_joins_words_into_characters():
    transcripts = read_transcripts(FIXTURE / TRANSCRIPT)
    assert len(transcripts) == 12
    assert transcripts["BAC009S0002W0122"] == "而对楼市成交抑制作用最大的限购"
    assert transcripts["BAC009S0724W0121"] == "广州市房地产中介协会分析"


def test_prepare_unpacked(tmp_path):
    corpus = make_corpus(tmp_path)
    counts, messages, warnings = prepare(corpus, tmp_path / "data")
    assert counts == {"train": 6, "dev": 2, "test": 2}
    train = tmp_path / "data" / "train"
    assert lines(train / "text")[0] == "BAC009S0002W0122 而对楼市成交抑制作用最大的限购"
    # sorted; S0003W0135 (no transcript) dropped
    assert [line.split()[0] for line in lines(train / "text")] == WAVS["train"][:-1]
    assert lines(train / "utt2spk")[-1] == "BAC009S0003W0134 S0003"
    assert lines(train / "spk2utt") == [
        "S0002 BAC009S0002W0122 BAC009S0002W0123 BAC009S0002W0124 BAC009S0002W0125 BAC009S0002W0127",
        "S0003 BAC009S0003W0134",
    ]
    for line in lines(train / "wav.scp"):
        utt_id, path = line.split()
        assert Path(path).is_absolute() and Path(path).name == f"{utt_id}.wav" and Path(path).is_file()
    assert lines(tmp_path / "data" / "test" / "text") == [
        "BAC009S0764W0121 甚至出现交易几乎停滞的情况",
        "BAC009S0764W0122 一二线城市虽然也处于调整中",
    ]
    assert "train: 7 wavs, 1 without a transcript (dropped), 6 kept from 2 speakers" in messages
    assert warnings == [
        f"2 of the 12 transcripts have no audio under {corpus / 'wav'} and are dropped: {', '.join(NO_AUDIO)}"
    ]


def test_prepare_packed_speaker_archives(tmp_path):
    unpacked = make_corpus(tmp_path / "unpacked")
    prepare(unpacked, tmp_path / "expected")
    corpus = make_corpus(tmp_path / "packed", packed=True)
    assert sorted(path.name for path in (corpus / "wav").iterdir()) == [
        "S0002.tar.gz", "S0003.tar.gz", "S0724.tar.gz", "S0764.tar.gz"
    ]
    counts, messages, _ = prepare(corpus, tmp_path / "data")
    assert counts == {"train": 6, "dev": 2, "test": 2}
    assert "unpacked 4/4 speaker archives in " + str(corpus / "wav") in messages
    assert not list((corpus / "wav").glob("*.tar.gz"))  # deleted after unpacking, as Kaldi does
    for split in ("train", "dev", "test"):
        for name in ("text", "utt2spk", "spk2utt"):
            assert lines(tmp_path / "data" / split / name) == lines(tmp_path / "expected" / split / name)
        for line in lines(tmp_path / "data" / split / "wav.scp"):
            assert sf.info(line.split()[1]).samplerate == 16000


def test_corrupt_archive_is_one_error_and_kept(tmp_path):
    corpus = make_corpus(tmp_path, packed=True)
    archive = corpus / "wav" / "S0764.tar.gz"
    archive.write_bytes(archive.read_bytes()[:100])
    with pytest.raises(CorpusError, match=f"cannot unpack {archive}: "):
        extract_speaker_archives(corpus / "wav", log=lambda message: None)
    assert archive.is_file()


def test_warning_names_the_first_ten_ids_without_audio(tmp_path):
    corpus = make_corpus(tmp_path)
    extra = [f"BAC009S0764W{n:04d}" for n in range(200, 215)]
    with open(corpus / TRANSCRIPT, "a", encoding="utf-8") as transcript:
        transcript.writelines(f"{utt_id} 城市\n" for utt_id in extra)
    _, _, warnings = prepare(corpus, tmp_path / "data")
    assert len(warnings) == 1
    listed = sorted(NO_AUDIO + extra)[:10]
    assert warnings[0].startswith("17 of the 27 transcripts have no audio")
    assert warnings[0].endswith(f"dropped: {', '.join(listed)}, ... (7 more)")


def test_empty_split_is_one_error_and_writes_nothing(tmp_path):
    corpus = make_corpus(tmp_path, wavs={"train": WAVS["train"], "dev": WAVS["dev"], "test": []})
    with pytest.raises(CorpusError) as err:
        prepare(corpus, tmp_path / "data")
    assert str(err.value).startswith(
        f"no utterance with both audio and a transcript in split(s) test of {corpus} (train 7 wavs, 6 "
        "transcribed; dev 2 wavs, 2 transcribed; test 0 wavs, 0 transcribed)"
    )
    assert not (tmp_path / "data").exists()


def test_not_an_aishell_folder_points_to_data_aishell(tmp_path):
    make_corpus(tmp_path)
    with pytest.raises(CorpusError) as err:
        prepare(tmp_path, tmp_path / "data")
    message = str(err.value)
    assert message.startswith(f"{tmp_path} is not an AISHELL-1 'data_aishell' folder: {tmp_path / 'wav'}")
    assert message.endswith(f"did you mean --aishell-dir {tmp_path / 'data_aishell'}?")


@pytest.mark.parametrize(
    "content, error",
    [
        ("BAC009S0002W0122 而 对\nBAC009S0002W0123\n", ":2: utterance BAC009S0002W0123 has no transcript"),
        ("BAC009S0002W0122 而 对\nBAC009S0002W0122 而\n", ":2: a second, different transcript of"),
        (None, ", line 1: not UTF-8 text: byte 0xb6 at byte offset 17 "),
    ],
)
def test_bad_transcript_lines(tmp_path, content, error):
    path = tmp_path / "transcript.txt"
    if content is None:
        path.write_bytes("BAC009S0002W0122 而 对\n".encode("gb18030"))
    else:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(CorpusError, match=error):
        read_transcripts(path)


def test_same_transcript_twice_is_fine(tmp_path):
    path = tmp_path / "transcript.txt"
    path.write_text("BAC009S0002W0122 而 对\n\nBAC009S0002W0122 而对\n", encoding="utf-8")
    assert read_transcripts(path) == {"BAC009S0002W0122": "而对"}


def test_cli(tmp_path, capsys):
    corpus = make_corpus(tmp_path, packed=True)
    assert main(["aishell", "--aishell-dir", str(corpus), "--out-dir", str(tmp_path / "data")]) == 0
    captured = capsys.readouterr()
    assert "wrote " + str(tmp_path / "data" / "test") + ": 2 utterances" in captured.out
    assert captured.err.startswith("warning: 2 of the 12 transcripts have no audio")
    assert main(["aishell", "--aishell-dir", str(tmp_path), "--out-dir", str(tmp_path / "data")]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"fairseq-accel-prepare: error: {tmp_path} is not an AISHELL-1")
    assert error.count("\n") == 1
