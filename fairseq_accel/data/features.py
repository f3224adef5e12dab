"""80-dimensional Kaldi filterbank features and global CMVN statistics for fairseq's S2T models.

Features are Kaldi's ``compute-fbank-feats`` (kaldi-native-fbank): 25 ms Povey windows every 10 ms at
16 kHz, 80 log mel bins, ``snip_edges`` (a frame only where the whole window fits). Dither is off so
the same audio always gives the same features (resumable runs, tests); Kaldi expects samples in the
int16 range, so [-1, 1] audio is scaled by 32768 first.

:class:`CmvnStats` accumulates the per-dimension mean and standard deviation of all training frames,
one utterance at a time in float64 (Chan et al.'s pairwise update, so worker processes can merge
partial statistics), and saves them in the ``.npz`` layout (arrays ``mean`` and ``std``) that
fairseq's ``global_cmvn`` feature transform loads from ``global_cmvn.stats_npz_path``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

import kaldi_native_fbank as knf
import numpy as np

from fairseq_accel.data.audio import TARGET_SAMPLE_RATE

NUM_MEL_BINS = 80
FRAME_LENGTH_MS = 25.0
FRAME_SHIFT_MS = 10.0
WINDOW_SAMPLES = int(TARGET_SAMPLE_RATE * FRAME_LENGTH_MS / 1000)  # 400
SHIFT_SAMPLES = int(TARGET_SAMPLE_RATE * FRAME_SHIFT_MS / 1000)  # 160
INT16_SCALE = 32768.0
# Variance floor of the saved statistics (as fairseq's examples/speech_to_text do): a channel that is
# constant over the training data (e.g. the top mel bins of upsampled 8 kHz audio) must not divide by 0.
MIN_VARIANCE = 1e-8


def fbank_options() -> knf.FbankOptions:
    """kaldi-native-fbank options of our features (Kaldi defaults otherwise: Povey window,
    pre-emphasis 0.97, DC removal, power spectrum, mel bins from 20 Hz to Nyquist)."""
    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = TARGET_SAMPLE_RATE
    opts.frame_opts.frame_length_ms = FRAME_LENGTH_MS
    opts.frame_opts.frame_shift_ms = FRAME_SHIFT_MS
    opts.frame_opts.dither = 0.0
    opts.frame_opts.snip_edges = True
    opts.mel_opts.num_bins = NUM_MEL_BINS
    return opts


def num_frames(num_samples: int) -> int:
    """Frames of :func:`compute_fbank` for ``num_samples`` samples at 16 kHz (0 below one window)."""
    if num_samples < WINDOW_SAMPLES:
        return 0
    return 1 + (num_samples - WINDOW_SAMPLES) // SHIFT_SAMPLES


def audio_seconds(frames: int) -> float:
    """Shortest audio that gives ``frames`` frames of :func:`compute_fbank` (within one shift of the real one)."""
    return 0.0 if frames < 1 else ((frames - 1) * FRAME_SHIFT_MS + FRAME_LENGTH_MS) / 1000


def compute_fbank(samples: np.ndarray) -> np.ndarray:
    """Log mel filterbank of 16 kHz float ``samples`` in [-1, 1]: float32 array (frames, 80)."""
    computer = knf.OnlineFbank(fbank_options())
    computer.accept_waveform(TARGET_SAMPLE_RATE, np.asarray(samples, dtype=np.float32) * INT16_SCALE)
    computer.input_finished()
    frames = [computer.get_frame(i) for i in range(computer.num_frames_ready)]
    if not frames:
        return np.zeros((0, NUM_MEL_BINS), dtype=np.float32)
    return np.stack(frames).astype(np.float32, copy=False)


class CmvnStats:
    """Streaming per-dimension mean and (population) variance of feature frames, in float64."""

    def __init__(self, dim: int = NUM_MEL_BINS) -> None:
        self.count = 0
        self.mean = np.zeros(dim, dtype=np.float64)
        self.m2 = np.zeros(dim, dtype=np.float64)  # sum of squared deviations from the mean

    @classmethod
    def of(cls, features: np.ndarray) -> "CmvnStats":
        """Statistics of one (frames, dim) array."""
        stats = cls(features.shape[1])
        if features.shape[0]:
            frames = features.astype(np.float64)
            stats.count = frames.shape[0]
            stats.mean = frames.mean(axis=0)
            stats.m2 = ((frames - stats.mean) ** 2).sum(axis=0)
        return stats

    def merge(self, other: "CmvnStats") -> None:
        """Add the frames summarised by ``other`` (Chan, Golub and LeVeque's pairwise update)."""
        if other.count == 0:
            return
        total = self.count + other.count
        delta = other.mean - self.mean
        self.mean = self.mean + delta * (other.count / total)
        self.m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / total)
        self.count = total

    @property
    def std(self) -> np.ndarray:
        """Population standard deviation per dimension, with the variance floored at :data:`MIN_VARIANCE`."""
        return np.sqrt(np.maximum(self.m2 / max(self.count, 1), MIN_VARIANCE))

    def save(self, path: Union[str, Path]) -> None:
        """Write ``mean`` and ``std`` (float32) as fairseq's ``GlobalCMVN`` transform reads them."""
        if self.count == 0:
            raise ValueError("no frames were accumulated: CMVN statistics are undefined")
        np.savez(path, mean=self.mean.astype(np.float32), std=self.std.astype(np.float32))
