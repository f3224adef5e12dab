"""Kaldi-style data directories: the hand-off format between our corpus preparers and feature extraction.

One directory per split holds four text files, each sorted by its first field in byte order (Kaldi's
``LC_ALL=C sort``):

* ``wav.scp`` -- ``<utt-id> <absolute path of a 16 kHz mono wav>``
* ``text``    -- ``<utt-id> <transcript>``
* ``utt2spk`` -- ``<utt-id> <speaker-id>``
* ``spk2utt`` -- ``<speaker-id> <utt-id> <utt-id> ...``

Kaldi's tools also need the order of ``utt2spk`` by utterance to agree with its order by speaker;
both our corpora guarantee that by starting every utterance id with its speaker id (AISHELL-1:
``BAC009`` + speaker + ``W....``, espeak: speaker + ``-`` + number).
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Dict, List, NamedTuple, Sequence

from fairseq_accel.data.gettext_corpus import CorpusError

KALDI_FILES = ("wav.scp", "text", "utt2spk", "spk2utt")


class Utterance(NamedTuple):
    """One line of each of ``wav.scp``, ``text`` and ``utt2spk``."""

    utt_id: str
    wav: Path
    text: str
    speaker: str


def _check(utt: Utterance) -> None:
    """Raise :class:`CorpusError` for a field that would break Kaldi's whitespace-separated format."""
    fields = (("utterance id", utt.utt_id), ("speaker id", utt.speaker), ("wav path", str(utt.wav)))
    for name, value in fields:
        if not value or any(ch.isspace() for ch in value):
            raise CorpusError(
                f"{name} {value!r} of utterance {utt.utt_id!r} is empty or holds whitespace, which Kaldi's "
                "data files cannot represent"
            )
    if not utt.text.strip() or "\n" in utt.text:
        raise CorpusError(f"transcript of utterance {utt.utt_id!r} is empty or spans lines: {utt.text!r}")


def write_kaldi_dir(directory: Path, utterances: Sequence[Utterance]) -> None:
    """Write ``wav.scp``, ``text``, ``utt2spk`` and ``spk2utt`` for ``utterances`` into ``directory``.

    Wav paths are written absolute. Raises :class:`CorpusError` for duplicate utterance ids and for
    ids, speakers, paths or transcripts the format cannot hold.
    """
    resolved = [utt._replace(wav=Path(utt.wav).resolve()) for utt in utterances]
    ordered = sorted(resolved, key=lambda utt: utt.utt_id)
    for previous, utt in zip(ordered, ordered[1:]):
        if previous.utt_id == utt.utt_id:
            raise CorpusError(f"utterance id {utt.utt_id!r} occurs twice in {directory}")
    for utt in ordered:
        _check(utt)
    spk2utt: Dict[str, List[str]] = defaultdict(list)
    for utt in ordered:
        spk2utt[utt.speaker].append(utt.utt_id)

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files = {
        "wav.scp": [f"{utt.utt_id} {utt.wav}" for utt in ordered],
        "text": [f"{utt.utt_id} {utt.text}" for utt in ordered],
        "utt2spk": [f"{utt.utt_id} {utt.speaker}" for utt in ordered],
        "spk2utt": [f"{spk} {' '.join(utts)}" for spk, utts in sorted(spk2utt.items())],
    }
    for name in KALDI_FILES:
        (directory / name).write_text("".join(line + "\n" for line in files[name]), encoding="utf-8")
