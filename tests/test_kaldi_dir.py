"""Kaldi data directories: sorting, spk2utt, absolute paths and the fields the format cannot hold."""
from pathlib import Path

import pytest

from fairseq_accel.data.errors import CorpusError
from fairseq_accel.data.kaldi_dir import Utterance, write_kaldi_dir


def test_files_are_sorted_and_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    utterances = [
        Utterance("b-2", Path("wav/b2.wav"), "two words", "b"),
        Utterance("a-1", Path("wav/a1.wav"), "one", "a"),
        Utterance("b-1", Path("wav/b1.wav"), "three more words", "b"),
    ]
    write_kaldi_dir(Path("out"), utterances)
    files = {path.name: path.read_text(encoding="utf-8") for path in (tmp_path / "out").iterdir()}
    assert files["text"] == "a-1 one\nb-1 three more words\nb-2 two words\n"
    assert files["utt2spk"] == "a-1 a\nb-1 b\nb-2 b\n"
    assert files["spk2utt"] == "a a-1\nb b-1 b-2\n"
    wav = tmp_path / "wav"
    assert files["wav.scp"] == f"a-1 {wav / 'a1.wav'}\nb-1 {wav / 'b1.wav'}\nb-2 {wav / 'b2.wav'}\n"


def utt(utt_id: str = "a", wav: str = "/x/a.wav", text: str = "t", speaker: str = "s") -> Utterance:
    return Utterance(utt_id, Path(wav), text, speaker)


@pytest.mark.parametrize(
    "utterances, error",
    [
        ([utt(), utt(wav="/x/b.wav")], "utterance id 'a' occurs twice"),
        ([utt(wav="/my data/a.wav")], "wav path '/my data/a.wav' of utterance 'a' is empty or holds white"),
        ([utt(speaker="spk 1")], "speaker id 'spk 1' of utterance 'a'"),
        ([utt(text=" ")], "transcript of utterance 'a' is empty"),
        ([utt(text="two\nlines")], "transcript of utterance 'a' is empty or spans lines"),
    ],
)
def test_rejects_what_kaldi_cannot_represent(tmp_path, utterances, error):
    with pytest.raises(CorpusError, match=error):
        write_kaldi_dir(tmp_path, utterances)
