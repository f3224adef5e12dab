"""Reading speech audio for feature extraction: mono, 16 kHz, optionally speed-perturbed.

Every problem with an audio file is one :class:`AudioError` that names the file and says what was
expected and what was found (multi-channel, empty, too short, unreadable, NaN/inf samples, float
samples far outside [-1, 1]), instead of a libsndfile or
numpy error deep inside a feature-extraction run.

Resampling to 16 kHz and Kaldi/sox-style speed perturbation are one polyphase resampling
(``scipy.signal.resample_poly``) by the reduced ratio ``16000 / rate / speed``, so the length of the
result is known from the file header alone (:func:`output_length`); a resumed run uses that to check
existing features without decoding the audio again.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Union

import numpy as np
import soundfile as sf

from fairseq_accel.data.errors import CorpusError

TARGET_SAMPLE_RATE = 16000
# Largest |sample| accepted in a float file. Resampled or mixed float audio may overshoot full scale a
# little (a few dB); anything beyond +6 dBFS is not a level problem but garbage or integer PCM in a
# float container, whose features would be meaningless.
MAX_AMPLITUDE = 2.0


class AudioError(CorpusError):
    """An audio file we cannot use; the message names the file, what was expected and what it holds.

    A :class:`CorpusError` (hence a ``ValueError``), so ``fairseq-accel-prepare`` prints it as one line
    and exits with status 2.
    """


@dataclass(frozen=True)
class AudioInfo:
    """What the header of a usable (mono, non-empty) audio file says."""

    path: Path
    sample_rate: int
    num_samples: int


def audio_info(path: Union[str, Path]) -> AudioInfo:
    """Read the header of ``path`` and check that the file is mono and not empty.

    Raises :class:`AudioError` for a missing, unreadable or corrupt file, for more than one channel and
    for a file without samples.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"audio file {path} does not exist")
    try:
        info = sf.info(str(path))
    except (sf.SoundFileError, RuntimeError) as err:
        raise AudioError(
            f"cannot read audio file {path}: expected a WAV/FLAC/OGG file that libsndfile can decode ({err})"
        ) from None
    if info.channels != 1:
        raise AudioError(
            f"audio file {path} has {info.channels} channels; expected mono (1 channel): "
            "pick or mix down a channel first, e.g. `sox in.wav out.wav remix 1`"
        )
    if info.frames <= 0:
        raise AudioError(f"audio file {path} is empty: expected speech samples, found 0 samples")
    return AudioInfo(path=path, sample_rate=int(info.samplerate), num_samples=int(info.frames))


def resampling_ratio(sample_rate: int, speed: Union[Fraction, float] = 1) -> Fraction:
    """``output samples / input samples`` for audio at ``sample_rate`` resampled to 16 kHz and
    speed-perturbed by ``speed``.

    Speed perturbation is Kaldi's (sox ``speed``, Ko et al., Interspeech 2015): the audio is played
    ``speed`` times faster at the same sample rate, so its duration scales by 1/speed and its pitch by
    speed. 16 kHz audio at speed 1 gives ratio 1 (the samples are used as they are).
    """
    speed = Fraction(speed).limit_denominator(1000)
    if speed <= 0:
        raise ValueError(f"speed factor must be > 0, got {speed}")
    return Fraction(TARGET_SAMPLE_RATE, sample_rate) / speed


def output_length(num_samples: int, ratio: Fraction) -> int:
    """Number of samples :func:`resample` returns for ``num_samples`` input samples (``resample_poly``
    gives ``ceil(n * up / down)``)."""
    return -(-num_samples * ratio.numerator // ratio.denominator)


def resample(samples: np.ndarray, ratio: Fraction) -> np.ndarray:
    """Polyphase resampling of 1-D ``samples`` by ``ratio`` (= up / down, already reduced)."""
    if ratio == 1:
        return samples
    from scipy.signal import resample_poly  # here, not at the top: scipy.signal takes ~1 s to import

    return resample_poly(samples, ratio.numerator, ratio.denominator).astype(np.float32)


def check_samples(path: Path, samples: np.ndarray) -> None:
    """Raise :class:`AudioError` for NaN/inf samples and for amplitudes beyond :data:`MAX_AMPLITUDE`.

    Integer PCM always decodes into [-1, 1); only float files can hold such values, and they mean a
    broken file or integer PCM written as float (amplitudes in the thousands), not speech.
    """
    finite = np.isfinite(samples)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise AudioError(
            f"audio file {path} holds {bad.size} NaN or infinite samples (first at sample {bad[0]}, "
            f"value {samples[bad[0]]}); expected finite float samples in [-1, 1]"
        )
    peak = int(np.argmax(np.abs(samples)))
    if abs(samples[peak]) > MAX_AMPLITUDE:
        raise AudioError(
            f"audio file {path} has samples far outside [-1, 1]: {samples[peak]:g} at sample {peak}; "
            f"expected float samples in [-1, 1] (|x| <= {MAX_AMPLITUDE:g} tolerated): integer PCM stored "
            "as float? rescale it (e.g. divide by 32768) or write it as integer PCM"
        )


def read_audio(info: AudioInfo) -> np.ndarray:
    """All samples of the (checked) file as float32 in [-1, 1] (see :func:`check_samples`)."""
    try:
        samples, _ = sf.read(str(info.path), dtype="float32", always_2d=False)
    except (sf.SoundFileError, RuntimeError) as err:
        raise AudioError(
            f"cannot decode audio file {info.path}: its header is readable, its samples are not ({err})"
        ) from None
    check_samples(info.path, samples)
    return samples


def load_audio(info: AudioInfo, speed: Union[Fraction, float] = 1) -> np.ndarray:
    """The file's samples at 16 kHz, speed-perturbed by ``speed``: float32 in [-1, 1], of
    ``output_length(info.num_samples, resampling_ratio(info.sample_rate, speed))`` samples."""
    return resample(read_audio(info), resampling_ratio(info.sample_rate, speed))
