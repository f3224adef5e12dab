"""A synthetic English read-speech corpus: real software messages spoken by espeak-ng, no download.

The sentences are the English side of the gettext de->en corpus (:mod:`fairseq_accel.data.gettext_corpus`),
kept when espeak-ng reads them the way they are written (:data:`SENTENCE_FILTERS`). The speakers are
espeak-ng voices: an English accent plus a voice variant (``en-gb-scotland+f3``), each with its own
speaking rate and pitch. The pipeline (:func:`build_espeak_corpus`):

1. :func:`english_sentences` and :func:`speakable_sentences` -- filter, normalise, dedup by transcript;
2. :func:`choose_sentences` -- the first N sentences in the order of an MD5 hash of the transcript,
   split into train/dev/test;
3. :func:`make_speakers` and :func:`plan_corpus` -- speakers split so that no dev or test voice
   (accent + variant) is heard in train; sentences dealt round-robin to the speakers of their split;
   train utterances get white or pink noise at a random SNR;
4. :func:`synthesize_corpus` -- espeak-ng (22.05 kHz) -> 16 kHz (scipy ``resample_poly``, polyphase
   with a Kaiser-window anti-aliasing filter, no sox needed) -> noise -> 16-bit mono wav, in parallel,
   skipping wavs that are already there and valid;
5. Kaldi data directories ``train``, ``dev``, ``test`` (and ``train_clean`` with ``keep_clean``).

Transcripts are lowercase words and apostrophes (``can't``). Sentences with digits are dropped rather
than spelled out because espeak-ng reads numbers differently per accent ("one hundred twelve" in
en-us, "one hundred and twelve" in en-gb) and by context ("3.5", "10:30", "x86"), so neither digits nor
our own spelling would match the audio. Every random choice comes from ``seed`` and the names involved
(voice, utterance id), so the corpus does not depend on ``jobs`` or on the order of work.
``utterances.tsv`` in the output folder records every utterance's voice, rate, pitch and noise.
"""
from __future__ import annotations

import io
import math
import os
import random
import re
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from fractions import Fraction
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import soundfile as sf

from fairseq_accel.data.audio import resample
from fairseq_accel.data.errors import CorpusError
from fairseq_accel.data.gettext_corpus import (
    FilterConfig,
    clean_pair,
    dedup_by_source,
    extract_pairs,
    filter_pairs,
    find_catalogs,
    stable_fraction,
)
from fairseq_accel.data.kaldi_dir import Utterance, write_kaldi_dir

ESPEAK = "espeak-ng"
INSTALL_HINT = "apt-get install espeak-ng"
SAMPLE_RATE = 16000
SPLITS = ("train", "dev", "test")
# The accents of espeak-ng 1.51 that need no MBROLA data (en-uk and the mb-* voices do).
ACCENTS = (
    "en-us", "en-us-nyc", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd",
    "en-029",
)
# Variants that change the voice but keep it human: male, female and the Klatt-synthesizer voices
# (whisper, croak, robots and the novelty voices are left out).
VARIANTS = (
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5",
    "klatt", "klatt2", "klatt3", "klatt4", "klatt5", "klatt6",
)
RATE_RANGE = (130, 190)  # words per minute (espeak-ng -s; default 175)
PITCH_RANGE = (30, 70)  # espeak-ng -p, 0-99 (default 50): scales the variant's own pitch range
SNR_RANGE_DB = (10.0, 30.0)
NOISE_TYPES = ("white", "pink")
MIN_WORDS, MAX_WORDS = 3, 20
DEFAULT_NUM_UTTS = 3000
DEFAULT_DEV_FRACTION = 0.05
DEFAULT_TEST_FRACTION = 0.05
DEFAULT_SEED = 1
PLAN_FILE = "utterances.tsv"


class Sentence(NamedTuple):
    """What espeak-ng reads (punctuation kept for prosody) and the ASR transcript of it."""

    spoken: str
    transcript: str


class Speaker(NamedTuple):
    """An espeak-ng voice (``accent+variant``, also the speaker id) with its rate and pitch."""

    voice: str
    rate: int
    pitch: int


class Noise(NamedTuple):
    """Additive noise of one utterance: ``kind`` in :data:`NOISE_TYPES`, SNR in dB, sample seed."""

    kind: str
    snr_db: float
    seed: int


class PlannedUtterance(NamedTuple):
    """Everything that determines one wav of the corpus."""

    utt_id: str
    split: str
    speaker: Speaker
    sentence: Sentence
    noise: Optional[Noise]


# --------------------------------------------------------------------------------------------------
# sentences
# --------------------------------------------------------------------------------------------------
def english_sentences(
    locale_dir: Path, catalog_lang: str = "de", log: Callable[[str], None] = print
) -> List[str]:
    """The sorted, unique English sentences of the gettext ``catalog_lang``->en corpus (cleaned, filtered
    and deduplicated exactly as ``fairseq-accel-prepare gettext`` does, before its split)."""
    catalogs = find_catalogs(locale_dir, catalog_lang)
    pairs = extract_pairs(catalogs, catalog_lang_is_source=True, log=log)
    pairs, _ = filter_pairs([clean_pair(pair) for pair in pairs], FilterConfig())
    sentences = sorted({pair.tgt for pair in dedup_by_source(pairs)})
    log(f"English sentences of the {catalog_lang}-en gettext corpus: {len(sentences)}")
    return sentences


_TYPOGRAPHY = str.maketrans(
    {"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-", "\u2014": "-"}
)
_OPTION = re.compile(r"(?:^|[\s(])--?\w")  # -v, --verbose, (-0)
_IDENTIFIER = re.compile(r"_|[a-z][A-Z]|\w\.\w")  # snake_case, camelCase, file.ext, e.g.
_SPEAKABLE = re.compile(r"[A-Za-z .,;:!?'\"()-]+")


def normalize_typography(text: str) -> str:
    """Typographic quotes and dashes as ASCII, the ellipsis character as three dots."""
    return text.translate(_TYPOGRAPHY).replace("\u2026", "...")


def asr_transcript(text: str) -> str:
    """The ASR reference of a spoken sentence: lowercase words, hyphens as spaces, no punctuation, and
    apostrophes only inside words (``can't``, ``user's``; quotes such as ``'name'`` are removed)."""
    text = re.sub(r"[^a-z']+", " ", normalize_typography(text).lower())
    return " ".join(re.sub(r"(?<![a-z])'|'(?![a-z])", " ", text).split())


def _word_count_out_of_range(text: str) -> bool:
    return not MIN_WORDS <= len(asr_transcript(text).split()) <= MAX_WORDS


# (name printed in the counts, predicate on the typography-normalised sentence that *drops* it), in order.
SENTENCE_FILTERS: Tuple[Tuple[str, Callable[[str], object]], ...] = (
    ("format placeholders (%s, {0})", lambda text: any(ch in text for ch in "%{}")),
    ("URLs, e-mail addresses and paths", lambda text: any(ch in text for ch in "/\\@")),
    ("command-line options (-v, --verbose)", _OPTION.search),
    ("digits (each accent reads numbers its own way)", lambda text: any(ch.isdigit() for ch in text)),
    ("identifiers (snake_case, camelCase, file.ext, e.g.)", _IDENTIFIER.search),
    ("other characters (non-ASCII letters, symbols)", lambda text: not _SPEAKABLE.fullmatch(text)),
    (f"fewer than {MIN_WORDS} or more than {MAX_WORDS} words", _word_count_out_of_range),
)


def speakable_sentences(sentences: Sequence[str], log: Callable[[str], None] = print) -> List[Sentence]:
    """Apply :data:`SENTENCE_FILTERS` in order (printing what is left after each), then keep one sentence
    per transcript (the smallest string), so that no transcript can land in two splits."""
    kept = [normalize_typography(text) for text in sentences]
    for name, drop in SENTENCE_FILTERS:
        kept = [text for text in kept if not drop(text)]
        log(f"after dropping {name}: {len(kept)}")
    by_transcript: Dict[str, str] = {}
    for text in sorted(kept):
        by_transcript.setdefault(asr_transcript(text), text)
    log(f"after dedup by transcript: {len(by_transcript)}")
    return sorted(Sentence(spoken, transcript) for transcript, spoken in by_transcript.items())


def split_sizes(total: int, dev_fraction: float, test_fraction: float, what: str = "items") -> Dict[str, int]:
    """Sizes of train/dev/test for ``total`` of ``what``: dev and test get their rounded share, at least 1
    each; :class:`CorpusError` if train would be empty."""
    if dev_fraction < 0 or test_fraction < 0 or dev_fraction + test_fraction >= 1:
        raise CorpusError(
            f"dev and test fractions must be >= 0 and sum to < 1, got dev {dev_fraction} + test "
            f"{test_fraction}"
        )
    dev = max(1, round(total * dev_fraction))
    test = max(1, round(total * test_fraction))
    if total - dev - test < 1:
        raise CorpusError(f"{total} {what} cannot fill train, dev ({dev}) and test ({test})")
    return {"train": total - dev - test, "dev": dev, "test": test}


def choose_sentences(
    sentences: Sequence[Sentence], num_utts: int, dev_fraction: float, test_fraction: float
) -> Dict[str, List[Sentence]]:
    """The first ``num_utts`` sentences in the order of :func:`stable_fraction` of their transcript:
    test takes the first ones, then dev, then train (so a split depends on the sentences, not on file
    or dictionary order)."""
    sizes = split_sizes(num_utts, dev_fraction, test_fraction, what="utterances (--num-utts)")
    if num_utts > len(sentences):
        raise CorpusError(
            f"--num-utts {num_utts} asks for more sentences than the {len(sentences)} speakable ones; "
            "lower it"
        )
    ordered = sorted(sentences, key=lambda sentence: (stable_fraction(sentence.transcript), sentence))
    chosen = {"test": ordered[: sizes["test"]], "dev": ordered[sizes["test"] : sizes["test"] + sizes["dev"]]}
    chosen["train"] = ordered[sizes["test"] + sizes["dev"] : num_utts]
    return chosen


# --------------------------------------------------------------------------------------------------
# speakers and the plan
# --------------------------------------------------------------------------------------------------
def make_speakers(
    accents: Sequence[str], variants: Sequence[str], dev_fraction: float, test_fraction: float, seed: int
) -> Dict[str, List[Speaker]]:
    """Every accent+variant voice with a rate and pitch drawn from ``seed`` and its name, split into
    train/dev/test in the order of a seeded hash of the voice: no dev or test voice occurs in train."""
    voices = [f"{accent}+{variant}" for accent in accents for variant in variants]
    sizes = split_sizes(len(voices), dev_fraction, test_fraction, what="voices")
    speakers = []
    for voice in sorted(voices, key=lambda voice: stable_fraction(f"{seed}/{voice}")):
        rng = random.Random(f"{seed}/{voice}")
        speakers.append(Speaker(voice, rng.randint(*RATE_RANGE), rng.randint(*PITCH_RANGE)))
    return {
        "test": speakers[: sizes["test"]],
        "dev": speakers[sizes["test"] : sizes["test"] + sizes["dev"]],
        "train": speakers[sizes["test"] + sizes["dev"] :],
    }


def plan_corpus(
    sentences: Dict[str, List[Sentence]], speakers: Dict[str, List[Speaker]], seed: int, noisy_train: bool = True
) -> List[PlannedUtterance]:
    """Deal each split's sentences round-robin to its speakers; give every train utterance noise (unless
    ``noisy_train`` is false).

    An utterance id is ``<voice>-<number>`` with a number unique over the corpus, so ids sort by
    speaker as Kaldi wants.
    """
    total = sum(len(items) for items in sentences.values())
    width = max(5, len(str(total - 1)))
    planned = []
    number = 0
    for split in SPLITS:
        for index, sentence in enumerate(sentences[split]):
            speaker = speakers[split][index % len(speakers[split])]
            utt_id = f"{speaker.voice}-{number:0{width}d}"
            noise = None
            if split == "train" and noisy_train:
                rng = random.Random(f"{seed}/noise/{utt_id}")
                snr_db = round(rng.uniform(*SNR_RANGE_DB), 1)
                noise = Noise(rng.choice(NOISE_TYPES), snr_db, rng.getrandbits(32))
            planned.append(PlannedUtterance(utt_id, split, speaker, sentence, noise))
            number += 1
    return planned


def plan_lines(planned: Sequence[PlannedUtterance]) -> str:
    """The plan as the tab-separated text of ``utterances.tsv`` (with a header line)."""
    lines = ["utt_id\tsplit\tvoice\trate\tpitch\tnoise\tsnr_db\tnoise_seed\tsentence"]
    for utt in planned:
        noise = [utt.noise.kind, str(utt.noise.snr_db), str(utt.noise.seed)] if utt.noise else ["-"] * 3
        speaker = [utt.speaker.voice, str(utt.speaker.rate), str(utt.speaker.pitch)]
        lines.append("\t".join([utt.utt_id, utt.split, *speaker, *noise, utt.sentence.spoken]))
    return "".join(line + "\n" for line in lines)


# --------------------------------------------------------------------------------------------------
# espeak-ng and audio
# --------------------------------------------------------------------------------------------------
def find_espeak() -> str:
    """The path of the espeak-ng program; :class:`CorpusError` with the install command if there is none."""
    path = shutil.which(ESPEAK)
    if path is None:
        raise CorpusError(f"{ESPEAK} is not installed (not found on PATH); install it with: {INSTALL_HINT}")
    return path


def check_voices(espeak: str, accents: Sequence[str], variants: Sequence[str]) -> None:
    """Raise :class:`CorpusError` naming the accents and variants this espeak-ng lacks (it would
    silently fall back to its default voice for an unknown variant)."""
    listed_accents = subprocess.run([espeak, "--voices=en"], capture_output=True, text=True).stdout
    listed_variants = subprocess.run([espeak, "--voices=variant"], capture_output=True, text=True).stdout
    languages = {line.split()[1] for line in listed_accents.splitlines()[1:] if len(line.split()) > 1}
    variant_files = set(listed_variants.split())
    missing = [accent for accent in accents if accent not in languages]
    missing += [f"+{variant}" for variant in variants if f"!v/{variant}" not in variant_files]
    if missing:
        raise CorpusError(
            f"{espeak} lacks the voices {', '.join(missing)} (see '{ESPEAK} --voices=en' and "
            f"'{ESPEAK} --voices=variant'); install the full espeak-ng-data package: {INSTALL_HINT}"
        )


def synthesize(espeak: str, speaker: Speaker, text: str) -> np.ndarray:
    """espeak-ng's reading of ``text`` as float32 samples at :data:`SAMPLE_RATE` (resampled from its
    native 22.05 kHz with a polyphase filter). The text goes through stdin, never the command line."""
    command = [espeak, "-v", speaker.voice, "-s", str(speaker.rate), "-p", str(speaker.pitch), "--stdout"]
    result = subprocess.run(command, input=text.encode("utf-8"), capture_output=True)
    audio, rate = np.zeros(0, dtype=np.float32), SAMPLE_RATE
    if result.returncode == 0 and result.stdout:
        audio, rate = sf.read(io.BytesIO(result.stdout), dtype="float32")
    if not len(audio):
        error = result.stderr.decode("utf-8", "replace").strip()
        raise CorpusError(f"'{' '.join(command)}' failed for the text {text!r}: {error or 'no audio'}")
    return resample(audio, Fraction(SAMPLE_RATE, rate))


def add_noise(audio: np.ndarray, noise: Noise) -> np.ndarray:
    """``audio`` plus white or pink (1/f power) Gaussian noise at ``noise.snr_db`` relative to the mean
    power of the whole clip, scaled down if it would clip."""
    rng = np.random.default_rng(noise.seed)
    samples = rng.standard_normal(len(audio))
    if noise.kind == "pink":
        spectrum = np.fft.rfft(samples)
        spectrum[0] = 0.0
        spectrum[1:] /= np.sqrt(np.arange(1, len(spectrum)))
        samples = np.fft.irfft(spectrum, n=len(audio))
    signal_power = float(np.mean(audio.astype(np.float64) ** 2))
    samples *= math.sqrt(signal_power / (float(np.mean(samples**2)) * 10 ** (noise.snr_db / 10)))
    mixed = audio + samples
    peak = float(np.max(np.abs(mixed)))
    return (mixed / peak * 0.99 if peak > 0.99 else mixed).astype(np.float32)


def wav_frames(path: Path) -> int:
    """Number of samples of ``path`` if it is a readable 16 kHz mono wav with audio, else 0."""
    try:
        info = sf.info(str(path))
    except (OSError, RuntimeError):  # soundfile raises LibsndfileError (a RuntimeError) for bad files
        return 0
    ok = info.samplerate == SAMPLE_RATE and info.channels == 1 and info.format == "WAV"
    return info.frames if ok else 0


def write_wav(path: Path, audio: np.ndarray) -> None:
    """Write 16-bit PCM through a temporary file, so an interrupted run leaves no truncated wav."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    sf.write(str(partial), audio, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    os.replace(partial, path)


def wav_path(out_dir: Path, split: str, utt_id: str) -> Path:
    """Where the wav of ``utt_id`` in ``split`` (or ``train_clean``) lives."""
    return Path(out_dir) / "wav" / split / f"{utt_id}.wav"


def _make_wavs(espeak: str, utt: PlannedUtterance, outputs: Dict[str, Path]) -> Tuple[float, bool]:
    """Write the wav(s) of one utterance unless all are valid already: ``outputs`` maps the split to its
    path (``train_clean`` is the noise-free copy). Returns (seconds of audio, whether it was skipped)."""
    frames = [wav_frames(path) for path in outputs.values()]
    if all(frames):
        return frames[0] / SAMPLE_RATE, True
    clean = synthesize(espeak, utt.speaker, utt.sentence.spoken)
    for split, path in outputs.items():
        write_wav(path, add_noise(clean, utt.noise) if utt.noise and split != "train_clean" else clean)
    return len(clean) / SAMPLE_RATE, False


def synthesize_corpus(
    espeak: str,
    planned: Sequence[PlannedUtterance],
    out_dir: Path,
    keep_clean: bool = False,
    jobs: int = 1,
    log: Callable[[str], None] = print,
) -> Dict[str, float]:
    """Make every planned wav with ``jobs`` threads (each runs espeak-ng processes), printing progress
    about ten times; return the seconds of audio per split."""
    todo = []
    for utt in planned:
        outputs = {utt.split: wav_path(out_dir, utt.split, utt.utt_id)}
        if keep_clean and utt.split == "train":
            outputs["train_clean"] = wav_path(out_dir, "train_clean", utt.utt_id)
        todo.append((utt, outputs))
    seconds = {split: 0.0 for split in SPLITS}
    done = skipped = 0
    step = max(1, math.ceil(len(todo) / 10))
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(_make_wavs, espeak, utt, outputs): utt for utt, outputs in todo}
        try:
            for future in as_completed(futures):
                duration, was_skipped = future.result()
                seconds[futures[future].split] += duration
                done += 1
                skipped += was_skipped
                if done % step == 0 or done == len(todo):
                    elapsed = time.perf_counter() - start
                    log(f"wavs: {done}/{len(todo)} ({skipped} already there), {elapsed:.1f} s")
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    made = done - skipped
    elapsed = time.perf_counter() - start
    if made:
        log(
            f"synthesized {made} utterances in {elapsed:.1f} s: {1000 * elapsed / made:.1f} ms per utterance "
            f"with {jobs} job(s)"
        )
    return seconds


# --------------------------------------------------------------------------------------------------
# the whole pipeline
# --------------------------------------------------------------------------------------------------
def build_espeak_corpus(
    out_dir: Path,
    num_utts: int = DEFAULT_NUM_UTTS,
    dev_fraction: float = DEFAULT_DEV_FRACTION,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    seed: int = DEFAULT_SEED,
    keep_clean: bool = False,
    noisy_train: bool = True,
    jobs: int = 1,
    locale_dir: Path = Path("/usr/share/locale"),
    catalog_lang: str = "de",
    log: Callable[[str], None] = print,
) -> Dict[str, int]:
    """Plan, synthesize and write the corpus; return the number of utterances per Kaldi directory.

    A rerun into the same ``out_dir`` resumes (valid wavs are kept) if it plans the same corpus;
    raises :class:`CorpusError` if ``utterances.tsv`` there describes a different one, for bad
    options and when espeak-ng or its voices are missing.
    """
    if jobs < 1:
        raise CorpusError(f"--jobs must be >= 1, got {jobs}")
    if keep_clean and not noisy_train:
        raise CorpusError("--keep-clean keeps a noise-free copy of noisy train audio; with --no-noise train is clean already")
    espeak = find_espeak()
    check_voices(espeak, ACCENTS, VARIANTS)
    split_sizes(num_utts, dev_fraction, test_fraction, what="utterances (--num-utts)")  # fail before reading

    sentences = speakable_sentences(english_sentences(locale_dir, catalog_lang, log=log), log=log)
    chosen = choose_sentences(sentences, num_utts, dev_fraction, test_fraction)
    speakers = make_speakers(ACCENTS, VARIANTS, dev_fraction, test_fraction, seed)
    for split in SPLITS:
        voices = ", ".join(speaker.voice for speaker in speakers[split]) if split != "train" else "the others"
        log(f"{split}: {len(chosen[split])} sentences, {len(speakers[split])} speakers ({voices})")
    planned = plan_corpus(chosen, speakers, seed, noisy_train)

    out_dir = Path(out_dir)
    plan_path = out_dir / PLAN_FILE
    plan = plan_lines(planned)
    if plan_path.is_file() and plan_path.read_text(encoding="utf-8") != plan:
        raise CorpusError(
            f"{out_dir} holds a different espeak corpus ({plan_path} differs from this run's plan: other "
            f"--num-utts, fractions, --seed or catalogs); use another --out-dir or delete that one"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    plan_path.write_text(plan, encoding="utf-8")

    seconds = synthesize_corpus(espeak, planned, out_dir, keep_clean=keep_clean, jobs=jobs, log=log)
    dirs = {split: [utt for utt in planned if utt.split == split] for split in SPLITS}
    if keep_clean:
        dirs["train_clean"] = dirs["train"]
    counts = {}
    for name, utts in dirs.items():
        rows = [
            Utterance(u.utt_id, wav_path(out_dir, name, u.utt_id), u.sentence.transcript, u.speaker.voice)
            for u in utts
        ]
        write_kaldi_dir(out_dir / name, rows)
        counts[name] = len(utts)
        hours = seconds["train" if name == "train_clean" else name] / 3600
        log(f"{out_dir / name}: {len(utts)} utterances, {hours:.2f} h")
    return counts
