"""Kaldi-style data directories -> the data that fairseq's stock ``--task speech_to_text`` trains on.

Input: one Kaldi data directory per split (``wav.scp``, ``text``, ``utt2spk``), read by
:func:`fairseq_accel.data.kaldi_dir.read_data_dir` (see there for what is accepted). Audio files may have
any sample rate (resampled to 16 kHz).

Output under ``out_dir`` (:func:`prepare_s2t`):

* ``fbank80/<split>/<id>.npy``: 80-dim Kaldi fbank per utterance, float32 (frames, 80);
* ``<split>.tsv``: columns ``id audio n_frames tgt_text speaker`` (absolute ``.npy`` paths);
* ``global_cmvn.npz``: mean and std of all training frames;
* ``spm_<unit><N>.model`` (+ ``.vocab``) trained on the training transcripts, and ``spm_<unit><N>.txt``,
  its vocabulary in fairseq's dictionary format (``spm_char.*`` for characters);
* ``config.yaml``: features, vocabulary, sentencepiece, global CMVN for every split, SpecAugment for the
  training split.

fairseq 0.12.3 opens ``global_cmvn.stats_npz_path`` and the ``audio`` column relative to the current
directory, not to the data folder, so both are written as absolute paths. After moving the folder, run
the command again with the new ``--out-dir``: it reuses the features and rewrites the small files.
The speed-perturbed copies of the training split (``--speed-perturb``) get ids ``sp<factor>-<utt-id>``,
as in Kaldi. An interrupted run continues where it stopped: features whose ``.npy`` exists with the
expected shape are reused.
"""
from __future__ import annotations

import csv
import multiprocessing
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import (
    Callable,
    Collection,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Set,
    Tuple,
)

import numpy as np
import yaml

from fairseq_accel.data.audio import (
    TARGET_SAMPLE_RATE,
    AudioError,
    AudioInfo,
    audio_info,
    load_audio,
    output_length,
    resampling_ratio,
)
from fairseq_accel.data.features import NUM_MEL_BINS, CmvnStats, compute_fbank, num_frames
from fairseq_accel.data.errors import CorpusError
from fairseq_accel.data.kaldi_dir import Utterance, first_ids, read_data_dir
from fairseq_accel.data.sentencepiece_model import SentencePieceSettings, train_sentencepiece, write_fairseq_vocab

FEATURE_DIR = "fbank80"
CMVN_FILENAME = "global_cmvn.npz"
CONFIG_FILENAME = "config.yaml"
TSV_COLUMNS = ("id", "audio", "n_frames", "tgt_text", "speaker")
UNITS = ("unigram", "bpe", "char")
DEFAULT_MAX_FRAMES = 3000  # 30 s
DEFAULT_LOG_EVERY = 1000
# LibriSpeech "basic" policy of SpecAugment (Park et al. 2019; fairseq's `lb`): one frequency mask of up
# to 27 bins and one time mask of up to 100 frames, no time warping. One mask of each keeps enough of the
# short utterances of small corpora. Keys as fairseq's specaugment transform reads them.
SPECAUGMENT = {
    "freq_mask_F": 27,
    "freq_mask_N": 1,
    "time_mask_T": 100,
    "time_mask_N": 1,
    "time_mask_p": 1.0,
    "time_warp_W": 0,
}


# --------------------------------------------------------------------------------------------------
# features (one job per output utterance; runs in worker processes)
# --------------------------------------------------------------------------------------------------
def format_speed(factor: float) -> str:
    """The factor as Kaldi writes it in ``sp0.9-<utt-id>``."""
    return f"{factor:g}"


def perturbed_name(name: str, factor: float) -> str:
    """The id or speaker of a speed-perturbed copy (Kaldi's ``sp<factor>-`` prefix; unchanged for 1)."""
    return name if factor == 1 else f"sp{format_speed(factor)}-{name}"


@dataclass(frozen=True)
class FeatureJob:
    """Features of one utterance copy: read ``utt.wav``, resample/perturb by ``speed``, save ``out_path``."""

    utt: Utterance
    speed: float
    out_path: Path
    max_frames: Optional[int]  # longer copies are dropped (training split only); None keeps all
    with_stats: bool  # return the CMVN statistics of the features (training split)

    @property
    def utt_id(self) -> str:
        return perturbed_name(self.utt.utt_id, self.speed)


@dataclass(frozen=True)
class FeatureResult:
    """What :func:`extract_features` did for one :class:`FeatureJob`."""

    utt_id: str
    n_frames: int
    dropped: bool = False  # longer than max_frames: no features written
    reused: bool = False  # the .npy of an earlier run had the expected shape
    resampled_from: Optional[int] = None  # sample rate of the file when it was resampled in this run
    stats: Optional[CmvnStats] = None


def _existing_features(path: Path, frames: int, with_stats: bool) -> Tuple[bool, Optional[np.ndarray]]:
    """Whether ``path`` holds a (frames, 80) array, and the array when ``with_stats`` needs it."""
    if not path.is_file():
        return False, None
    try:
        features = np.load(path, mmap_mode=None if with_stats else "r")
    except (OSError, ValueError):
        return False, None  # unreadable leftovers are recomputed
    return features.shape == (frames, NUM_MEL_BINS), features if with_stats else None


def _save_npy(path: Path, array: np.ndarray) -> None:
    """Write ``array`` to ``path`` through a temporary file, so an interrupted run leaves no partial .npy."""
    temporary = path.with_name(path.name + ".partial")
    with open(temporary, "wb") as fh:
        np.save(fh, array)
    os.replace(temporary, path)


def _frames_of(job: FeatureJob, info: AudioInfo) -> int:
    """Frames of ``job``'s features, from the header alone; :class:`AudioError` if there are none."""
    frames = num_frames(output_length(info.num_samples, resampling_ratio(info.sample_rate, job.speed)))
    if frames == 0:
        raise AudioError(
            f"audio file {info.path} is too short: {info.num_samples} samples at {info.sample_rate} Hz"
            f"{'' if job.speed == 1 else f' (speed {format_speed(job.speed)})'}; expected at least one "
            "25 ms frame"
        )
    return frames


def extract_features(job: FeatureJob) -> FeatureResult:
    """Compute (or reuse) the features of ``job``. The frame count comes from the audio header first, so
    over-long copies are dropped, and existing features checked, without decoding the audio.

    Every :class:`AudioError` names the utterance as well as the file.
    """
    try:
        info = audio_info(job.utt.wav)
        frames = _frames_of(job, info)
        if job.max_frames is not None and frames > job.max_frames:
            return FeatureResult(job.utt_id, frames, dropped=True)
        reused, features = _existing_features(job.out_path, frames, job.with_stats)
        if not reused:
            features = compute_fbank(load_audio(info, job.speed))
    except AudioError as err:
        raise AudioError(f"{err} [utterance {job.utt.utt_id}]") from None
    resampled_from = None
    if not reused:
        assert features.shape == (frames, NUM_MEL_BINS), (job, features.shape)
        _save_npy(job.out_path, features)
        resampled_from = info.sample_rate if info.sample_rate != TARGET_SAMPLE_RATE else None
    stats = CmvnStats.of(features) if job.with_stats else None
    return FeatureResult(job.utt_id, frames, reused=reused, resampled_from=resampled_from, stats=stats)


def _run_jobs(
    jobs: Sequence[FeatureJob], workers: int, log_every: int, split: str, log: Callable[[str], None]
) -> List[FeatureResult]:
    """Run :func:`extract_features` on ``jobs`` with ``workers`` processes, logging progress."""
    start = time.time()
    results: List[FeatureResult] = []

    def progress(done: Iterator[FeatureResult]) -> None:
        for result in done:
            results.append(result)
            if len(results) % log_every == 0 and len(results) < len(jobs):
                log(f"{split}: {len(results)}/{len(jobs)} utterances ({time.time() - start:.1f} s)")

    if workers == 1:
        progress(map(extract_features, jobs))
    else:
        with multiprocessing.Pool(workers) as pool:
            progress(pool.imap_unordered(extract_features, jobs, chunksize=4))
    return results


# --------------------------------------------------------------------------------------------------
# vocabulary
# --------------------------------------------------------------------------------------------------
def spm_prefix(unit: str, vocab_size: int) -> str:
    """File name stem of the sentencepiece model and vocabulary: ``spm_unigram500``, ``spm_char``."""
    return "spm_char" if unit == "char" else f"spm_{unit}{vocab_size}"


# --------------------------------------------------------------------------------------------------
# manifests and config
# --------------------------------------------------------------------------------------------------
def write_tsv(path: Path, rows: Iterable[Mapping[str, object]]) -> None:
    """A fairseq S2T manifest: tab-separated :data:`TSV_COLUMNS`, no quoting (as fairseq reads it)."""
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(
            fh, fieldnames=TSV_COLUMNS, delimiter="\t", quoting=csv.QUOTE_NONE, lineterminator="\n"
        )
        writer.writeheader()
        writer.writerows(rows)


def data_config(vocab_filename: str, spm_model: Path, cmvn_path: Path, specaugment: bool = True) -> Dict[str, object]:
    """The ``config.yaml`` of fairseq's speech_to_text task for our features and vocabulary (SpecAugment on
    the training split unless ``specaugment`` is False)."""
    config = {
        "input_feat_per_channel": NUM_MEL_BINS,
        "input_channels": 1,
        "vocab_filename": vocab_filename,  # fairseq reads it from the data folder
        "bpe_tokenizer": {"bpe": "sentencepiece", "sentencepiece_model": str(spm_model)},
        "global_cmvn": {"stats_npz_path": str(cmvn_path)},
        # "_train" applies to splits named train*, "*" to all others.
        "feature_transforms": {"_train": ["global_cmvn", "specaugment"], "*": ["global_cmvn"]},
        "specaugment": dict(SPECAUGMENT),
    }
    if not specaugment:
        config["feature_transforms"] = {"*": ["global_cmvn"]}
        del config["specaugment"]
    return config


@dataclass(frozen=True)
class S2TOptions:
    """Settings of :func:`prepare_s2t` (the ``fairseq-accel-prepare s2t`` options)."""

    train_split: str = "train"
    vocab_size: int = 500
    unit: str = "unigram"
    speed_factors: Tuple[float, ...] = (1.0,)  # training split only; must include 1.0
    max_frames: int = DEFAULT_MAX_FRAMES  # training split only
    specaugment: bool = True  # in config.yaml, for the training split
    jobs: int = 1
    log_every: int = DEFAULT_LOG_EVERY

    def sentencepiece_settings(self) -> SentencePieceSettings:
        """The transcripts' units: every character covered, sentencepiece's default normalisation, ids
        that agree with fairseq's dictionary, and ``vocab_size`` an upper limit on small corpora."""
        return SentencePieceSettings(
            model_type=self.unit,
            vocab_size=self.vocab_size,
            fairseq_special_ids=True,
            hard_vocab_limit=False,
            threads=self.jobs,
        )

    def validate(self, splits: Collection[str]) -> None:
        """Raise :class:`CorpusError` for settings that cannot work with data dirs named ``splits``."""
        if self.train_split not in splits:
            raise CorpusError(f"the training split '{self.train_split}' is not among the data dirs "
                              f"({', '.join(splits)}); name it with --train-split")
        if not self.train_split.startswith("train"):
            raise CorpusError(
                f"the training split is named '{self.train_split}', but fairseq's speech_to_text task "
                "applies training transforms (SpecAugment) only to splits named train*; rename it"
            )
        for name in splits:
            if not name or "/" in name or name.startswith("."):
                raise CorpusError(f"split name '{name}' cannot be a file name")
        if self.unit not in UNITS:
            raise CorpusError(f"unknown unit '{self.unit}'; choose one of {', '.join(UNITS)}")
        factors = self.speed_factors
        if 1 not in factors or len(set(factors)) != len(factors) or min(factors) <= 0:
            raise CorpusError(
                "--speed-perturb takes distinct positive factors including 1.0 (the original audio), e.g. "
                f"0.9 1.0 1.1; got {' '.join(format_speed(f) for f in factors)}"
            )
        for name, value in (
            ("--vocab-size", self.vocab_size),
            ("--max-frames", self.max_frames),
            ("--jobs", self.jobs),
            ("--log-every", self.log_every),
        ):
            if value < 1:
                raise CorpusError(f"{name} must be >= 1, got {value}")


@dataclass
class _SplitData:
    """The manifest rows of one split, the CMVN statistics of its frames (training split) and the
    files resampled for it (sample rate -> files)."""

    rows: List[Dict[str, object]]
    stats: CmvnStats
    resampled: Dict[int, Set[Path]]


def _prepare_split(
    split: str,
    utterances: Sequence[Utterance],
    out_dir: Path,
    options: S2TOptions,
    log: Callable[[str], None],
) -> _SplitData:
    """Extract the features of one split (speed-perturbed, filtered by length and with statistics if it
    is the training split) and build its manifest rows, sorted by id."""
    is_train = split == options.train_split
    feature_dir = out_dir / FEATURE_DIR / split
    feature_dir.mkdir(parents=True, exist_ok=True)
    jobs = sorted(
        (
            FeatureJob(
                utt=utt,
                speed=speed,
                out_path=feature_dir / f"{perturbed_name(utt.utt_id, speed)}.npy",
                max_frames=options.max_frames if is_train else None,
                with_stats=is_train,
            )
            for utt in utterances
            for speed in (options.speed_factors if is_train else (1.0,))
        ),
        key=lambda job: job.utt_id,
    )
    start = time.time()
    results = {r.utt_id: r for r in _run_jobs(jobs, options.jobs, options.log_every, split, log)}
    data = _SplitData(rows=[], stats=CmvnStats(), resampled=defaultdict(set))
    for job in jobs:
        result = results[job.utt_id]
        if result.dropped:
            continue
        if result.resampled_from is not None:
            data.resampled[result.resampled_from].add(job.utt.wav)
        if result.stats is not None:
            data.stats.merge(result.stats)
        data.rows.append(
            {
                "id": job.utt_id,
                "audio": job.out_path.as_posix(),
                "n_frames": result.n_frames,
                "tgt_text": job.utt.text,
                "speaker": perturbed_name(job.utt.speaker, job.speed),
            }
        )
    frames = sum(int(row["n_frames"]) for row in data.rows)
    reused = sum(result.reused for result in results.values())
    log(
        f"{split}: {len(data.rows)} utterances, {frames} frames ({frames / 360000:.2f} h) in "
        f"{time.time() - start:.1f} s" + (f"; {reused} reused from an earlier run" if reused else "")
    )
    dropped = [result.utt_id for result in results.values() if result.dropped]
    if dropped:
        log(
            f"warning: {split}: dropped {len(dropped)} utterances longer than --max-frames "
            f"{options.max_frames}: {first_ids(dropped)}"
        )
    if not data.rows:
        raise CorpusError(
            f"split '{split}' has no utterances left: all are longer than --max-frames {options.max_frames}"
        )
    return data


def prepare_s2t(
    data_dirs: Mapping[str, Path],
    out_dir: Path,
    options: S2TOptions = S2TOptions(),
    log: Callable[[str], None] = print,
) -> Dict[str, int]:
    """Write fairseq S2T data for the Kaldi data dirs ``{split: dir}`` to ``out_dir`` (see the module
    docstring); return the number of utterances in each ``<split>.tsv``.

    Only the training split is speed-perturbed, filtered by ``max_frames`` and used for the CMVN
    statistics and the sentencepiece model; the other splits keep every utterance, so that their
    scores stay comparable with published ones.
    """
    start = time.time()
    options.validate(list(data_dirs))
    out_dir = Path(out_dir).absolute()
    corpus = {split: read_data_dir(Path(path)) for split, path in data_dirs.items()}
    for split, utterances in corpus.items():
        log(f"{split}: {len(utterances)} utterances in {data_dirs[split]}")

    splits = {split: _prepare_split(split, utts, out_dir, options, log) for split, utts in corpus.items()}
    resampled: Dict[int, Set[Path]] = defaultdict(set)
    for data in splits.values():
        for rate, files in data.resampled.items():
            resampled[rate] |= files
    for rate, files in sorted(resampled.items()):
        log(f"resampled {len(files)} files from {rate} Hz to {TARGET_SAMPLE_RATE} Hz")

    cmvn_path = out_dir / CMVN_FILENAME
    splits[options.train_split].stats.save(cmvn_path)
    prefix = out_dir / spm_prefix(options.unit, options.vocab_size)
    train_texts = [utt.text for utt in corpus[options.train_split]]
    spm_model = train_sentencepiece(prefix, options.sentencepiece_settings(), sentences=train_texts)
    vocab_path = prefix.with_suffix(".txt")
    pieces = write_fairseq_vocab(spm_model, vocab_path)
    log(f"sentencepiece {options.unit} model {spm_model.name}: {pieces} pieces + 4 special symbols")
    for split, data in splits.items():
        write_tsv(out_dir / f"{split}.tsv", data.rows)
    config = data_config(vocab_path.name, spm_model, cmvn_path, options.specaugment)
    (out_dir / CONFIG_FILENAME).write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    log(f"wrote {len(splits)} manifests and {CONFIG_FILENAME} to {out_dir} in {time.time() - start:.1f} s")
    return {split: len(data.rows) for split, data in splits.items()}
