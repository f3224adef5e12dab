"""AISHELL-1 (OpenSLR resource 33, Mandarin read speech) as Kaldi data directories with character transcripts.

The download ``data_aishell.tgz`` unpacks to::

    data_aishell/transcript/aishell_transcript_v0.8.txt   BAC009S0002W0122 而 对 楼市 成交 ...
    data_aishell/wav/S0002.tar.gz ...                     one archive per speaker, holding
                                                          train/S0002/BAC009S0002W0122.wav ...

and once the speaker archives are unpacked (:func:`extract_speaker_archives` does it, as Kaldi's
``download_and_untar.sh`` does, deleting each archive after it) the audio is
``data_aishell/wav/{train,dev,test}/<speaker>/<utterance>.wav`` (16 kHz mono).

As in Kaldi's ``egs/aishell/s5/local/aishell_data_prep.sh``, the split is the folder under ``wav/``, the
speaker is the folder above the wav (``S0002``, which is also ``utt_id[6:11]``), and
only utterances with both audio and a transcript are kept. Unlike Kaldi we say what is dropped: the
number of wavs without a transcript, and the transcript ids without audio in one warning. The
transcripts are word-segmented; the ``text`` we write joins the words into a string of characters, the
modelling units of the recipes and what CER counts.
"""
from __future__ import annotations

import sys
import tarfile
import zlib
from pathlib import Path
from typing import Callable, Dict, List

from fairseq_accel.data.errors import CorpusError
from fairseq_accel.data.kaldi_dir import Utterance, first_ids, write_kaldi_dir
from fairseq_accel.data.text_files import read_utf8_lines

SPLITS = ("train", "dev", "test")
TRANSCRIPT = Path("transcript") / "aishell_transcript_v0.8.txt"


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def check_aishell_dir(aishell_dir: Path) -> None:
    """Raise :class:`CorpusError` unless ``aishell_dir`` has ``wav/`` and the transcript file."""
    aishell_dir = Path(aishell_dir)
    missing = [str(aishell_dir / name) for name in ("wav", TRANSCRIPT) if not (aishell_dir / name).exists()]
    if missing:
        hint = ""
        if (aishell_dir / "data_aishell").is_dir():
            hint = f"; did you mean --aishell-dir {aishell_dir / 'data_aishell'}?"
        raise CorpusError(
            f"{aishell_dir} is not an AISHELL-1 'data_aishell' folder: {' and '.join(missing)} missing "
            f"(expected wav/ and {TRANSCRIPT} from data_aishell.tgz){hint}"
        )


def extract_speaker_archives(wav_dir: Path, log: Callable[[str], None] = print) -> int:
    """Unpack every ``*.tar.gz`` in ``wav_dir`` into it and delete the archive; return how many.

    An archive is deleted only after it was unpacked completely, so an interrupted run unpacks it again.
    """
    archives = sorted(Path(wav_dir).glob("*.tar.gz"))
    for number, archive in enumerate(archives, 1):
        try:
            with tarfile.open(archive, "r:gz") as tar:
                tar.extractall(wav_dir, filter="data")
        except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
            raise CorpusError(f"cannot unpack {archive}: {err}") from err
        archive.unlink()
        if number % 50 == 0 or number == len(archives):
            log(f"unpacked {number}/{len(archives)} speaker archives in {wav_dir}")
    return len(archives)


def read_transcripts(path: Path) -> Dict[str, str]:
    """Utterance id -> transcript with the word-separating spaces removed (a string of characters).

    Raises :class:`CorpusError` for a file that is not UTF-8, a line with an id but no text, and an id
    with two different transcripts.
    """
    transcripts: Dict[str, str] = {}
    for number, line in enumerate(read_utf8_lines(path), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) == 1:
            raise CorpusError(f"{path}:{number}: utterance {fields[0]} has no transcript")
        text = "".join(fields[1:])
        if transcripts.setdefault(fields[0], text) != text:
            raise CorpusError(f"{path}:{number}: a second, different transcript of utterance {fields[0]}")
    return transcripts


def find_wavs(wav_dir: Path) -> Dict[str, Dict[str, Path]]:
    """Split -> utterance id -> wav path for ``wav_dir/<split>/<speaker>/<utterance>.wav``.

    Raises :class:`CorpusError` if an utterance id occurs twice.
    """
    found: Dict[str, Dict[str, Path]] = {}
    seen: Dict[str, Path] = {}
    for split in SPLITS:
        found[split] = {}
        for path in sorted((Path(wav_dir) / split).glob("*/*.wav")):
            if path.stem in seen:
                raise CorpusError(f"utterance {path.stem} occurs twice: {seen[path.stem]} and {path}")
            seen[path.stem] = path
            found[split][path.stem] = path
    return found


def prepare_aishell(
    aishell_dir: Path,
    out_dir: Path,
    log: Callable[[str], None] = print,
    warn: Callable[[str], None] = _warn,
) -> Dict[str, int]:
    """Write the Kaldi data directories ``out_dir/{train,dev,test}``; return their utterance counts.

    Unpacks speaker archives first if there are any. Raises :class:`CorpusError` for a folder that is
    not AISHELL-1 and when a split would be empty; nothing is written then.
    """
    aishell_dir = Path(aishell_dir)
    check_aishell_dir(aishell_dir)
    wav_dir = aishell_dir / "wav"
    extract_speaker_archives(wav_dir, log=log)
    transcripts = read_transcripts(aishell_dir / TRANSCRIPT)
    wavs = find_wavs(wav_dir)

    kept: Dict[str, List[Utterance]] = {}
    for split in SPLITS:
        kept[split] = [
            Utterance(utt_id, path, transcripts[utt_id], path.parent.name)
            for utt_id, path in wavs[split].items()
            if utt_id in transcripts
        ]
        speakers = len({utt.speaker for utt in kept[split]})
        log(
            f"{split}: {len(wavs[split])} wavs, {len(wavs[split]) - len(kept[split])} without a transcript "
            f"(dropped), {len(kept[split])} kept from {speakers} speakers"
        )
    with_audio = {utt_id for split in SPLITS for utt_id in wavs[split]}
    no_audio = set(transcripts) - with_audio
    if no_audio:
        warn(
            f"{len(no_audio)} of the {len(transcripts)} transcripts have no audio under {wav_dir} and are "
            f"dropped: {first_ids(no_audio)}"
        )
    empty = [split for split in SPLITS if not kept[split]]
    if empty:
        found = "; ".join(f"{name} {len(wavs[name])} wavs, {len(kept[name])} transcribed" for name in SPLITS)
        raise CorpusError(
            f"no utterance with both audio and a transcript in split(s) {', '.join(empty)} of {aishell_dir} "
            f"({found}); expected wav/{{train,dev,test}}/<speaker>/<utterance>.wav or speaker archives "
            "wav/*.tar.gz"
        )
    for split in SPLITS:
        write_kaldi_dir(Path(out_dir) / split, kept[split])
        log(f"wrote {Path(out_dir) / split}: {len(kept[split])} utterances")
    return {split: len(kept[split]) for split in SPLITS}
