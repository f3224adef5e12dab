"""Kaldi-style data directories: the hand-off format between our corpus preparers and feature extraction.

This module writes them (:func:`write_kaldi_dir`, for our corpus preparers) and reads them
(:func:`read_data_dir`, for feature extraction). One directory per split holds four UTF-8 text files,
each sorted by its first field in byte order (Kaldi's ``LC_ALL=C sort``):

* ``wav.scp`` -- ``<utt-id> <absolute path of a 16 kHz mono wav>``
* ``text``    -- ``<utt-id> <transcript>``
* ``utt2spk`` -- ``<utt-id> <speaker-id>``
* ``spk2utt`` -- ``<speaker-id> <utt-id> <utt-id> ...``

Kaldi's tools also need the order of ``utt2spk`` by utterance to agree with its order by speaker;
both our corpora guarantee that by starting every utterance id with its speaker id (AISHELL-1:
``BAC009`` + speaker + ``W....``, espeak: speaker + ``-`` + number).

The reader accepts directories written by other tools too: unsorted files, relative wav paths (taken
from the current directory, as in Kaldi recipes), any sample rate, and a UTF-8 byte order mark (which
is dropped; it would otherwise become part of the first utterance id). It needs ``wav.scp``, ``text``
and ``utt2spk`` (``spk2utt`` is derived from ``utt2spk``) and refuses Kaldi's piped ``wav.scp``
commands (``<utt-id> sox ... - |``) and ``segments`` files: write each utterance to its own file first.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Collection, Dict, List, NamedTuple, Sequence

from fairseq_accel.data.errors import CorpusError
from fairseq_accel.data.text_files import read_utf8_lines

INPUT_FILES = ("wav.scp", "text", "utt2spk")  # what the reader needs
KALDI_FILES = INPUT_FILES + ("spk2utt",)  # what the writer writes
LISTED_IDS = 10  # how many offending utterance ids an error message shows


class Utterance(NamedTuple):
    """One line of each of ``wav.scp``, ``text`` and ``utt2spk``."""

    utt_id: str
    wav: Path
    text: str
    speaker: str


# --------------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------------
def first_ids(ids: Collection[str]) -> str:
    """``a, b, c``: the first :data:`LISTED_IDS` ids in sorted order, and how many more there are."""
    ids = sorted(ids)
    more = f", ... ({len(ids) - LISTED_IDS} more)" if len(ids) > LISTED_IDS else ""
    return ", ".join(ids[:LISTED_IDS]) + more


def read_table(path: Path) -> Dict[str, str]:
    """``<utt-id> <value>`` lines of a Kaldi table: id -> value (the rest of the line, stripped).

    Raises :class:`CorpusError` for a missing or non-UTF-8 file, a line without a value, an id used twice
    and an id that cannot be a file name (it names the feature file).
    """
    if not path.is_file():
        raise CorpusError(f"{path} does not exist: a Kaldi data directory needs {', '.join(INPUT_FILES)}")
    table: Dict[str, str] = {}
    for number, line in enumerate(read_utf8_lines(path), 1):
        fields = line.strip().split(maxsplit=1)
        if not fields:
            continue
        if len(fields) < 2:
            raise CorpusError(f"{path}, line {number}: expected '<utt-id> <value>', got '{line.strip()}'")
        utt_id, value = fields
        if utt_id in table:
            raise CorpusError(f"{path}, line {number}: utterance id '{utt_id}' occurs twice")
        if "/" in utt_id or utt_id in (".", ".."):
            raise CorpusError(f"{path}, line {number}: utterance id '{utt_id}' cannot be a file name")
        table[utt_id] = value
    return table


def _check_no_pipes(wav_scp: Path, wavs: Dict[str, str]) -> None:
    """Raise :class:`CorpusError` for the first piped command of ``wav.scp``."""
    for utt_id, path in wavs.items():
        if path.endswith("|") or path.startswith("|") or " | " in path:
            raise CorpusError(
                f"{wav_scp}: utterance '{utt_id}' is a piped command ('{path}'); piped commands are not "
                "supported: write the audio to files (e.g. with sox) and list their paths in wav.scp"
            )


def read_data_dir(data_dir: Path) -> List[Utterance]:
    """The utterances of a Kaldi data directory, sorted by id; see the module docstring for the format.

    Raises :class:`CorpusError` naming the file for unsupported input (piped ``wav.scp`` entries, a
    ``segments`` file) and malformed lines (e.g. an empty transcript), and one error listing the ids of
    transcripts without audio, audio without transcript and utterances without speaker.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise CorpusError(f"data directory {data_dir} does not exist")
    if (data_dir / "segments").exists():
        raise CorpusError(
            f"{data_dir / 'segments'}: segments files are not supported; cut each utterance into its own "
            "audio file and list those in wav.scp"
        )
    wav_scp, text, utt2spk = (data_dir / name for name in INPUT_FILES)
    wavs, texts, speakers = (read_table(path) for path in (wav_scp, text, utt2spk))
    _check_no_pipes(wav_scp, wavs)
    problems = []
    for ids, what in (
        (texts.keys() - wavs.keys(), f"transcripts in {text} have no audio in {wav_scp}"),
        (wavs.keys() - texts.keys(), f"audio files in {wav_scp} have no transcript in {text}"),
        (wavs.keys() - speakers.keys(), f"utterances of {wav_scp} have no speaker in {utt2spk}"),
    ):
        if ids:
            problems.append(f"{len(ids)} {what}: {first_ids(ids)}")
    if problems:
        raise CorpusError("; ".join(problems))
    if not wavs:
        raise CorpusError(f"data directory {data_dir} has no utterances ({wav_scp} is empty)")
    return [
        Utterance(utt_id, Path(wavs[utt_id]), " ".join(texts[utt_id].split()), speakers[utt_id])
        for utt_id in sorted(wavs)
    ]
