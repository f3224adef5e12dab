"""The espeak-ng English ASR corpus: sentence filters and transcripts, speakers and plan, noise, and a
12-utterance corpus synthesized through the CLI (skipped where espeak-ng is not installed)."""
import csv
import re
import shutil
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import soundfile as sf

from conftest import REPO_ROOT, cli_output, run_cli
from fairseq_accel.cli.prepare import main
from fairseq_accel.data.errors import CorpusError
from fairseq_accel.data.espeak_corpus import (
    ACCENTS,
    DEFAULT_DEV_FRACTION,
    DEFAULT_SEED,
    DEFAULT_TEST_FRACTION,
    INSTALL_HINT,
    PITCH_RANGE,
    RATE_RANGE,
    SNR_RANGE_DB,
    SPLITS,
    VARIANTS,
    Noise,
    Sentence,
    Speaker,
    add_noise,
    asr_transcript,
    check_voices,
    choose_sentences,
    english_sentences,
    find_espeak,
    make_speakers,
    plan_corpus,
    speakable_sentences,
    split_sizes,
    synthesize,
)

NO_ESPEAK = f"needs espeak-ng ({INSTALL_HINT})"
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason=NO_ESPEAK)


# --------------------------------------------------------------------------------------------------
# sentences
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, transcript",
    [
        ("Could not open the file.", "could not open the file"),
        ("Don\u2019t use \u201cSave As\u201d \u2013 it\u2019s broken\u2026", "don't use save as it's broken"),
        ("Can't read the user's 'config' (the users') file!", "can't read the user's config the users file"),
        ("Self-signed key: end-of-file", "self signed key end of file"),
        ("WARNING: GPG key expired", "warning gpg key expired"),
    ],
)
def test_asr_transcript(text, transcript):
    assert asr_transcript(text) == transcript


DROPPED = [
    "Could not open %s for reading",  # placeholder
    "Invalid value {0} for this option",
    "See https://example.org for more details",  # URL
    "Send bug reports to bugs at example dot org@",
    "Use --force to overwrite the file",  # option
    "cannot specify (-0) with this command",
    "Copy 12 files to the disk",  # digits
    "Invalid value for max_size here",  # identifiers
    "Cannot open the file.txt document",
    "Use the GdkRGBA color for this",
    "Sort e.g. by the name",
    "Stadt Zürich ist schön",  # other characters
    "Add a new item & save",
    "Save as",  # too few words
    " ".join(["word"] * 21),  # too many words
]
KEPT = [
    "Could not open the file.",
    "could not open the file",  # same transcript as the one above: dedup keeps the smaller string
    "Don\u2019t ask again",
    "Self-signed key found",
    " ".join(["word"] * 20),
]


def test_speakable_sentences_filters_and_dedups():
    messages: List[str] = []
    sentences = speakable_sentences(DROPPED + KEPT, log=messages.append)
    assert sentences == [
        Sentence("Could not open the file.", "could not open the file"),
        Sentence("Don't ask again", "don't ask again"),
        Sentence("Self-signed key found", "self signed key found"),
        Sentence(" ".join(["word"] * 20), " ".join(["word"] * 20)),
    ]
    counts = [int(message.rsplit(": ", 1)[1]) for message in messages]
    assert counts == [18, 16, 14, 13, 9, 7, 5, 4]  # each filter drops its own examples
    assert messages[0] == "after dropping format placeholders (%s, {0}): 18"


def test_split_sizes():
    assert split_sizes(12, 0.05, 0.05) == {"train": 10, "dev": 1, "test": 1}
    assert split_sizes(3000, 0.05, 0.1) == {"train": 2550, "dev": 150, "test": 300}
    with pytest.raises(CorpusError, match="2 voices cannot fill train, dev \\(1\\) and test \\(1\\)"):
        split_sizes(2, 0.05, 0.05, what="voices")
    with pytest.raises(CorpusError, match="must be >= 0 and sum to < 1"):
        split_sizes(100, 0.5, 0.5)


def test_choose_sentences_is_a_fixed_order():
    sentences = [Sentence(f"Sentence number {word}", f"sentence number {word}") for word in "abcdefghij"]
    chosen = choose_sentences(sentences, 6, 0.2, 0.2)
    assert {split: len(items) for split, items in chosen.items()} == {"test": 1, "dev": 1, "train": 4}
    more = choose_sentences(list(reversed(sentences)), 10, 0.2, 0.2)
    assert more["test"][0] == chosen["test"][0]  # input order does not matter; test starts the same
    assert len({s for items in more.values() for s in items}) == 10
    with pytest.raises(CorpusError, match="--num-utts 11 asks for more sentences than the 10 speakable"):
        choose_sentences(sentences, 11, 0.2, 0.2)


# --------------------------------------------------------------------------------------------------
# speakers, plan, noise
# --------------------------------------------------------------------------------------------------
def test_speakers_are_held_out_and_deterministic():
    speakers = make_speakers(ACCENTS, VARIANTS, 0.05, 0.05, seed=1)
    voices = {split: {speaker.voice for speaker in items} for split, items in speakers.items()}
    assert {split: len(items) for split, items in voices.items()} == {"test": 8, "dev": 8, "train": 136}
    assert not voices["train"] & voices["test"] and not voices["train"] & voices["dev"]
    assert not voices["dev"] & voices["test"]
    assert set.union(*voices.values()) == {f"{a}+{v}" for a in ACCENTS for v in VARIANTS}
    for speaker in sum(speakers.values(), []):
        assert RATE_RANGE[0] <= speaker.rate <= RATE_RANGE[1]
        assert PITCH_RANGE[0] <= speaker.pitch <= PITCH_RANGE[1]
    assert make_speakers(ACCENTS, VARIANTS, 0.05, 0.05, seed=1) == speakers
    assert make_speakers(ACCENTS, VARIANTS, 0.05, 0.05, seed=2)["test"] != speakers["test"]


def test_plan_ids_sort_like_kaldi_and_only_train_is_noisy():
    speakers = make_speakers(ACCENTS, VARIANTS, 0.05, 0.05, seed=1)
    sentences = {
        split: [Sentence(f"{split} sentence {i}", f"{split} sentence {i}") for i in range(n)]
        for split, n in (("train", 300), ("dev", 20), ("test", 20))
    }
    planned = plan_corpus(sentences, speakers, seed=1)
    assert len({utt.utt_id for utt in planned}) == 340
    for utt in planned:
        assert utt.utt_id.startswith(utt.speaker.voice + "-") and utt.speaker in speakers[utt.split]
        assert (utt.noise is not None) == (utt.split == "train")
        if utt.noise:
            assert SNR_RANGE_DB[0] <= utt.noise.snr_db <= SNR_RANGE_DB[1]
    # Kaldi: utt2spk sorted by utterance is also sorted by speaker
    for split in ("train", "dev", "test"):
        by_utt = sorted((utt.utt_id, utt.speaker.voice) for utt in planned if utt.split == split)
        assert [spk for _, spk in by_utt] == sorted(spk for _, spk in by_utt)
    assert {utt.noise.kind for utt in planned if utt.noise} == {"white", "pink"}
    clean = plan_corpus(sentences, speakers, seed=1, noisy_train=False)
    assert [utt._replace(noise=None) for utt in planned] == clean  # only the noise differs


def test_mini_recipe_corpus_holds_out_its_test_sentences_and_voices():
    """The corpus the mini ASR recipe plans (its --num_utts, the default fractions and seed, this machine's
    catalogs): no dev or test transcript and no dev or test voice occurs in train."""
    locale_dir = Path("/usr/share/locale")
    if not any(locale_dir.glob("de/LC_MESSAGES/*.mo")):
        pytest.skip(f"needs the German gettext catalogs under {locale_dir}")
    recipe = (REPO_ROOT / "egs" / "mini_espeak" / "asr" / "run.sh").read_text(encoding="utf-8")
    num_utts = int(re.search(r"^num_utts=(\d+)", recipe, re.MULTILINE).group(1))
    sentences = speakable_sentences(english_sentences(locale_dir, log=lambda _: None), log=lambda _: None)
    chosen = choose_sentences(sentences, num_utts, DEFAULT_DEV_FRACTION, DEFAULT_TEST_FRACTION)
    speakers = make_speakers(ACCENTS, VARIANTS, DEFAULT_DEV_FRACTION, DEFAULT_TEST_FRACTION, DEFAULT_SEED)
    planned = plan_corpus(chosen, speakers, DEFAULT_SEED)
    heard = {split: {utt.speaker.voice for utt in planned if utt.split == split} for split in SPLITS}
    said = {split: {utt.sentence.transcript for utt in planned if utt.split == split} for split in SPLITS}
    assert len(said["train"]) + len(said["dev"]) + len(said["test"]) == num_utts
    for held_out in ("dev", "test"):
        assert said[held_out] and not said[held_out] & said["train"]
        assert heard[held_out] and not heard[held_out] & heard["train"]


@pytest.mark.parametrize("kind", ["white", "pink"])
def test_add_noise_hits_the_snr(kind):
    audio = (0.3 * np.sin(2 * np.pi * 200 * np.arange(16000) / 16000)).astype(np.float32)
    noisy = add_noise(audio, Noise(kind, 12.5, seed=7))
    noise = noisy.astype(np.float64) - audio
    snr = 10 * np.log10(np.mean(audio.astype(np.float64) ** 2) / np.mean(noise**2))
    assert snr == pytest.approx(12.5, abs=0.01)
    assert np.array_equal(noisy, add_noise(audio, Noise(kind, 12.5, seed=7)))
    power = np.abs(np.fft.rfft(noise)) ** 2
    low, high = power[10:800].mean(), power[4000:8000].mean()  # 10-800 Hz vs 4-8 kHz
    assert (low / high > 10) == (kind == "pink")


def test_missing_espeak_is_one_error(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(CorpusError, match="espeak-ng is not installed .*: apt-get install espeak-ng"):
        find_espeak()


@needs_espeak
def test_synthesis_failure_is_one_error():
    with pytest.raises(CorpusError, match="'.*espeak-ng -v xx-nosuch .*' failed for the text 'Hello there': "):
        synthesize(find_espeak(), Speaker("xx-nosuch", 150, 50), "Hello there")


@needs_espeak
def test_check_voices_names_what_is_missing():
    check_voices(find_espeak(), ACCENTS, VARIANTS)
    with pytest.raises(CorpusError, match="lacks the voices en-xx, \\+nosuchvariant "):
        check_voices(find_espeak(), ["en-us", "en-xx"], ["m1", "nosuchvariant"])


# --------------------------------------------------------------------------------------------------
# the CLI: a 12-utterance corpus
# --------------------------------------------------------------------------------------------------
def kaldi_file(directory: Path, name: str) -> Dict[str, str]:
    lines = (directory / name).read_text(encoding="utf-8").splitlines()
    assert lines == sorted(lines), f"{directory / name} is not sorted"
    return dict(line.split(" ", 1) for line in lines)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    if shutil.which("espeak-ng") is None:
        pytest.skip(NO_ESPEAK)
    out = tmp_path_factory.mktemp("espeak") / "corpus"
    options = ["--out-dir", out, "--num-utts", "12", "--jobs", "2", "--keep-clean"]
    result = run_cli(["fairseq-accel-prepare", "espeak", *options])
    assert result.returncode == 0, cli_output(result)
    assert "synthesized 12 utterances in " in result.stdout
    return out


def test_cli_writes_kaldi_dirs_of_16khz_mono_wavs(corpus):
    sizes = {"train": 10, "dev": 1, "test": 1, "train_clean": 10}
    for split, size in sizes.items():
        wavs = kaldi_file(corpus / split, "wav.scp")
        texts = kaldi_file(corpus / split, "text")
        assert len(wavs) == len(texts) == size and wavs.keys() == texts.keys()
        assert kaldi_file(corpus / split, "utt2spk").keys() == wavs.keys()
        for utt_id, path in wavs.items():
            assert Path(path).is_absolute() and Path(path) == corpus / "wav" / split / f"{utt_id}.wav"
            info = sf.info(path)
            assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
            assert 0.5 < info.duration < 15
            assert re.fullmatch(r"[a-z']+( [a-z']+){2,19}", texts[utt_id])


def test_cli_holds_out_dev_and_test_speakers_and_sentences(corpus):
    speakers = {split: set(kaldi_file(corpus / split, "utt2spk").values()) for split in SPLITS}
    assert not speakers["train"] & speakers["test"] and not speakers["train"] & speakers["dev"]
    sentences = {split: set(kaldi_file(corpus / split, "text").values()) for split in SPLITS}
    assert not sentences["train"] & sentences["test"] and not sentences["train"] & sentences["dev"]
    spk2utt = kaldi_file(corpus / "train", "spk2utt")
    assert set(spk2utt) == speakers["train"]


def test_cli_noise_only_on_train_and_plan_file(corpus):
    with open(corpus / "utterances.tsv", encoding="utf-8", newline="") as tsv:
        rows = list(csv.DictReader(tsv, delimiter="\t"))
    assert len(rows) == 12
    for row in rows:
        if row["split"] != "train":
            assert row["noise"] == "-"
            continue
        noisy, _ = sf.read(str(corpus / "wav" / "train" / f"{row['utt_id']}.wav"))
        clean, _ = sf.read(str(corpus / "wav" / "train_clean" / f"{row['utt_id']}.wav"))
        snr = 10 * np.log10(np.mean(clean**2) / np.mean((noisy - clean) ** 2))
        assert snr == pytest.approx(float(row["snr_db"]), abs=0.3)  # 16-bit rounding of both files


def test_cli_resumes_and_refuses_another_plan(corpus, capsys):
    damaged = sorted((corpus / "wav" / "test").glob("*.wav"))[0]
    damaged.write_bytes(b"RIFF")
    kept = sorted((corpus / "wav" / "train").glob("*.wav"))[0]
    mtime = kept.stat().st_mtime_ns
    assert main(["espeak", "--out-dir", str(corpus), "--num-utts", "12", "--keep-clean"]) == 0
    assert "wavs: 12/12 (11 already there)" in capsys.readouterr().out
    assert sf.info(str(damaged)).frames > 0 and kept.stat().st_mtime_ns == mtime

    assert main(["espeak", "--out-dir", str(corpus), "--num-utts", "12", "--seed", "2"]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"fairseq-accel-prepare: error: {corpus} holds a different espeak corpus")
    assert error.count("\n") == 1


def test_cli_without_espeak_says_how_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert main(["espeak", "--out-dir", str(tmp_path / "corpus")]) == 2
    assert capsys.readouterr().err == (
        "fairseq-accel-prepare: error: espeak-ng is not installed (not found on PATH); install it with: "
        "apt-get install espeak-ng\n"
    )


@needs_espeak
@pytest.mark.parametrize(
    "options, error",
    [
        (["--num-utts", "2"], "2 utterances (--num-utts) cannot fill train, dev (1) and test (1)"),
        (["--jobs", "0"], "--jobs must be >= 1, got 0"),
        (["--dev-fraction", "0.6", "--test-fraction", "0.4"], "dev and test fractions must be >= 0 and sum to < 1"),
        (["--keep-clean", "--no-noise"], "--keep-clean keeps a noise-free copy of noisy train audio"),
    ],
)
def test_cli_bad_options(tmp_path, capsys, options, error):
    assert main(["espeak", "--out-dir", str(tmp_path), *options]) == 2
    message = capsys.readouterr().err
    assert message.startswith(f"fairseq-accel-prepare: error: {error}") and message.count("\n") == 1
