"""Kaldi data dirs -> fairseq S2T data (``fairseq-accel-prepare s2t``): features, CMVN, speed perturbation,
vocabulary, config.yaml, clear errors for bad audio and data dirs, and the stock speech_to_text task
reading the result."""
import shutil
from pathlib import Path
from typing import Dict, List, Optional

import kaldi_native_fbank as knf
import numpy as np
import pytest
import sentencepiece as spm
import soundfile as sf
import yaml
from fairseq import options, tasks

from conftest import USER_DIR, cli_output, run_cli
import fairseq_accel.plugin  # noqa: F401  (registers the plugin, installs its fairseq patches)
from fairseq_accel.cli.prepare import main
from fairseq_accel.data.audio import resampling_ratio
from fairseq_accel.data.features import CmvnStats
from fairseq_accel.data.kaldi_dir import INPUT_FILES as KALDI_INPUT_FILES
from fairseq_accel.data.kaldi_dir import read_data_dir
from fairseq_accel.compat.s2t_config_check import check_s2t_data_config
from fairseq_accel.data.s2t_manifest import S2TOptions, spm_prefix
from fairseq_accel.data.sentencepiece_model import train_sentencepiece, write_fairseq_vocab

RNG_SEED = 7
SENTENCES = [
    "the cat sat on the mat",
    "a quick brown fox jumps",
    "open the file menu",
    "save the document now",
    "close all windows",
    "print the page",
    "hello world again",
    "the dog barks at night",
]
MAX_FRAMES = 150
SPEEDS = ("0.9", "1.0", "1.1")


def tone(seconds: float, rate: int, freq: float, seed: int) -> np.ndarray:
    """A speech-like test signal: a sine in 0.2 s bursts plus a little noise, in [-1, 1]."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    envelope = (np.sin(2 * np.pi * 2.5 * t) > 0).astype(np.float32)
    signal = 0.3 * envelope * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(t.size)
    return signal.astype(np.float32)


def write_data_dir(
    folder: Path, audio: Dict[str, Path], texts: Dict[str, str], speakers: Optional[Dict[str, str]] = None
) -> Path:
    """A Kaldi data dir (wav.scp, text, utt2spk) for the given utterances."""
    folder.mkdir(parents=True, exist_ok=True)
    speakers = speakers or {utt: utt.split("-")[0] for utt in audio}
    for name, table in (("wav.scp", audio), ("text", texts), ("utt2spk", speakers)):
        (folder / name).write_text("".join(f"{u} {v}\n" for u, v in sorted(table.items())), encoding="utf-8")
    return folder


def write_wav(path: Path, samples: np.ndarray, rate: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), samples, rate, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Dict[str, Path]:
    """Train (6 utterances at 16 kHz, 2 at 8 kHz, one too long), dev (2) and test (2, one at 8 kHz)."""
    root = tmp_path_factory.mktemp("s2t_corpus")
    wavs = root / "wavs"
    splits: Dict[str, Dict[str, Path]] = {"train": {}, "dev": {}, "test": {}}
    seed = RNG_SEED
    for split, utts in {
        "train": [("spkA-001", 0.8, 16000), ("spkA-002", 1.0, 16000), ("spkA-003", 1.2, 16000),
                  ("spkB-001", 0.7, 16000), ("spkB-002", 0.9, 16000), ("spkB-003", 1.1, 16000),
                  ("spkC-001", 1.0, 8000), ("spkC-002", 0.8, 8000), ("spkA-long", 2.0, 16000)],
        "dev": [("spkD-001", 0.9, 16000), ("spkD-002", 1.0, 16000)],
        "test": [("spkE-001", 0.8, 16000), ("spkE-002", 1.0, 8000)],
    }.items():
        for utt, seconds, rate in utts:
            seed += 1
            samples = tone(seconds, rate, 200 + 40 * seed % 600, seed)
            splits[split][utt] = write_wav(wavs / f"{utt}.wav", samples, rate)
    dirs = {}
    for split, audio in splits.items():
        texts = {utt: SENTENCES[i % len(SENTENCES)] for i, utt in enumerate(sorted(audio))}
        dirs[split] = write_data_dir(root / "data" / split, audio, texts)
    return dirs


def s2t_command(dirs: Dict[str, Path], out_dir: Path, *extra: str) -> List[str]:
    return [
        "fairseq-accel-prepare", "s2t",
        "--data-dirs", *(f"{split}={path}" for split, path in dirs.items()),
        "--out-dir", str(out_dir), "--vocab-size", "60", "--unit", "unigram",
        "--speed-perturb", *SPEEDS, "--max-frames", str(MAX_FRAMES), *extra,
    ]


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    """The S2T data of ``corpus`` written by the CLI (2 processes); (out_dir, CLI output)."""
    out_dir = tmp_path_factory.mktemp("s2t") / "data"
    result = run_cli(s2t_command(corpus, out_dir, "--jobs", "2", "--log-every", "10"))
    assert result.returncode == 0, cli_output(result)
    return out_dir, result.stdout + result.stderr


def read_tsv(path: Path) -> List[Dict[str, str]]:
    header, *lines = path.read_text(encoding="utf-8").splitlines()
    return [dict(zip(header.split("\t"), line.split("\t"))) for line in lines]


def test_manifests_list_features_of_the_right_shape(prepared, corpus):
    out_dir, _ = prepared
    for split in ("train", "dev", "test"):
        header = (out_dir / f"{split}.tsv").read_text().splitlines()[0]
        assert header == "id\taudio\tn_frames\ttgt_text\tspeaker"
        rows = read_tsv(out_dir / f"{split}.tsv")
        for row in rows:
            audio = Path(row["audio"])
            assert audio.is_absolute() and audio.parent == out_dir / "fbank80" / split
            features = np.load(audio)
            assert features.dtype == np.float32 and features.shape == (int(row["n_frames"]), 80)
    train = {row["id"]: row for row in read_tsv(out_dir / "train.tsv")}
    base = [line.split()[0] for line in (corpus["train"] / "wav.scp").read_text().splitlines()]
    kept = [utt for utt in base if utt != "spkA-long"]
    assert sorted(train) == sorted(f"sp{f}-{u}" if f != "1.0" else u for u in kept for f in SPEEDS)
    assert train["sp0.9-spkA-001"]["speaker"] == "sp0.9-spkA" and train["spkA-001"]["speaker"] == "spkA"
    assert train["spkA-001"]["tgt_text"] == train["sp1.1-spkA-001"]["tgt_text"] == SENTENCES[0]
    assert sorted(row["id"] for row in read_tsv(out_dir / "dev.tsv")) == ["spkD-001", "spkD-002"]


def test_features_match_kaldi_native_fbank(prepared, corpus):
    out_dir, _ = prepared
    samples, rate = sf.read(str(corpus["train"].parent.parent / "wavs" / "spkA-002.wav"), dtype="float32")
    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0
    opts.mel_opts.num_bins = 80
    fbank = knf.OnlineFbank(opts)
    fbank.accept_waveform(rate, (samples * 32768).tolist())
    fbank.input_finished()
    expected = np.stack([fbank.get_frame(i) for i in range(fbank.num_frames_ready)])
    np.testing.assert_allclose(np.load(out_dir / "fbank80" / "train" / "spkA-002.npy"), expected, atol=1e-4)


def test_cmvn_stats_are_mean_and_std_of_all_training_frames(prepared):
    out_dir, _ = prepared
    frames = np.concatenate([np.load(row["audio"]) for row in read_tsv(out_dir / "train.tsv")])
    frames = frames.astype(np.float64)
    stats = np.load(out_dir / "global_cmvn.npz")
    assert set(stats.files) == {"mean", "std"}
    np.testing.assert_allclose(stats["mean"], frames.mean(axis=0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats["std"], frames.std(axis=0), rtol=1e-5, atol=1e-5)


def test_cmvn_merge_equals_one_pass():
    rng = np.random.default_rng(0)
    parts = [rng.normal(5, 3, size=(n, 4)) for n in (1, 7, 30)]
    merged = CmvnStats(4)
    for part in parts:
        merged.merge(CmvnStats.of(part))
    whole = np.concatenate(parts)
    np.testing.assert_allclose(merged.mean, whole.mean(axis=0))
    np.testing.assert_allclose(merged.std, whole.std(axis=0))


def test_speed_perturbation_scales_duration_by_one_over_factor(prepared):
    out_dir, _ = prepared
    frames = {row["id"]: int(row["n_frames"]) for row in read_tsv(out_dir / "train.tsv")}
    for utt in ("spkA-003", "spkC-001"):
        for factor in (0.9, 1.1):
            assert frames[f"sp{factor}-{utt}"] / frames[utt] == pytest.approx(1 / factor, rel=0.02)
    assert resampling_ratio(8000, 1.1) == pytest.approx(2 / 1.1)


def test_vocabulary_is_a_fairseq_dictionary_of_the_sentencepiece_pieces(prepared):
    out_dir, _ = prepared
    model = spm.SentencePieceProcessor(model_file=str(out_dir / "spm_unigram60.model"))
    lines = (out_dir / "spm_unigram60.txt").read_text(encoding="utf-8").splitlines()
    assert all(line.endswith(" 1") and len(line.split(" ")) == 2 for line in lines)
    pieces = [line.split(" ")[0] for line in lines]
    assert not {"<unk>", "<s>", "</s>", "<pad>"} & set(pieces)
    # fairseq adds its 4 special symbols first, so the dictionary's ids equal sentencepiece's
    assert pieces == [model.id_to_piece(i) for i in range(4, model.get_piece_size())]


def test_config_yaml(prepared):
    out_dir, _ = prepared
    config = yaml.safe_load((out_dir / "config.yaml").read_text())
    assert config["input_feat_per_channel"] == 80
    assert config["vocab_filename"] == "spm_unigram60.txt"
    assert config["bpe_tokenizer"] == {
        "bpe": "sentencepiece", "sentencepiece_model": str(out_dir / "spm_unigram60.model")
    }
    assert config["global_cmvn"] == {"stats_npz_path": str(out_dir / "global_cmvn.npz")}
    assert config["feature_transforms"] == {"_train": ["global_cmvn", "specaugment"], "*": ["global_cmvn"]}
    assert config["specaugment"] == {
        "freq_mask_F": 27, "freq_mask_N": 1, "time_mask_T": 100, "time_mask_N": 1, "time_mask_p": 1.0,
        "time_warp_W": 0,
    }


def test_cli_reports_progress_resampling_once_and_dropped_utterances(prepared):
    _, output = prepared
    assert "train: 10/27 utterances" in output
    assert output.count("resampled") == 1
    assert "resampled 3 files from 8000 Hz to 16000 Hz" in output
    assert output.count("dropped") == 1
    assert "warning: train: dropped 3 utterances longer than --max-frames 150: sp0.9-spkA-long, " in output


def test_rerun_in_a_moved_folder_reuses_features_and_recomputes_bad_ones(prepared, corpus, tmp_path, capsys):
    out_dir, _ = prepared
    moved = tmp_path / "moved"
    shutil.copytree(out_dir, moved)
    np.save(moved / "fbank80" / "train" / "spkB-001.npy", np.zeros((3, 80), dtype=np.float32))
    assert main(s2t_command(corpus, moved)[1:]) == 0
    output = capsys.readouterr().out
    assert "train: 24 utterances" in output and "23 reused from an earlier run" in output
    assert "dev: 2 utterances" in output and "2 reused" in output
    assert "resampled" not in output  # the 8 kHz files were not decoded again
    rows = read_tsv(moved / "train.tsv")
    assert [r["id"] for r in rows] == [r["id"] for r in read_tsv(out_dir / "train.tsv")]
    assert all(Path(r["audio"]).parent == moved / "fbank80" / "train" for r in rows)
    recomputed = np.load(moved / "fbank80" / "train" / "spkB-001.npy")
    np.testing.assert_array_equal(recomputed, np.load(out_dir / "fbank80" / "train" / "spkB-001.npy"))


# ------------------------------------------------------------------------------------------------------
# bad input: one clear error (exit status 2) naming the file
# ------------------------------------------------------------------------------------------------------
# float WAVs with one bad sample (at index 1234) among speech-like samples
FLOAT_WAVS = {"nan": np.nan, "inf": -np.inf, "int_pcm_as_float": 3276.0}


def bad_audio(folder: Path, kind: str) -> Path:
    path = folder / f"{kind}.wav"
    if kind == "stereo":
        return write_wav(path, np.stack([tone(0.5, 16000, 300, 1)] * 2, axis=1), 16000)
    if kind == "empty":
        return write_wav(path, np.zeros(0, dtype=np.float32), 16000)
    if kind == "too_short":
        return write_wav(path, tone(0.01, 16000, 300, 1), 16000)
    if kind == "corrupt":
        path.write_bytes(b"RIFF this is not a wav file" * 20)
        return path
    if kind in FLOAT_WAVS:
        samples = tone(0.5, 16000, 300, 1)
        samples[1234] = FLOAT_WAVS[kind]
        sf.write(str(path), samples, 16000, subtype="FLOAT")
        return path
    assert kind == "missing"
    return path


@pytest.mark.parametrize(
    "kind, message",
    [
        ("stereo", "has 2 channels; expected mono (1 channel)"),
        ("empty", "is empty: expected speech samples, found 0 samples"),
        ("too_short", "is too short: 160 samples at 16000 Hz"),
        ("corrupt", "cannot read audio file"),
        ("missing", "does not exist"),
        ("nan", "holds 1 NaN or infinite samples (first at sample 1234, value nan)"),
        ("inf", "holds 1 NaN or infinite samples (first at sample 1234, value -inf)"),
        ("int_pcm_as_float", "has samples far outside [-1, 1]: 3276 at sample 1234"),
    ],
)
def test_bad_audio_gives_one_clear_error(kind, message, tmp_path, capsys):
    good = write_wav(tmp_path / "good.wav", tone(0.5, 16000, 300, 2), 16000)
    bad = bad_audio(tmp_path, kind)
    data = write_data_dir(tmp_path / "train", {"s-1": good, "s-2": bad}, {"s-1": "one", "s-2": "two"})
    assert main(["s2t", "--data-dirs", f"train={data}", "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fairseq-accel-prepare: error: "), err
    assert str(bad) in err[0] and message in err[0] and "[utterance s-2]" in err[0]


def test_float_audio_slightly_over_full_scale_is_accepted(tmp_path):
    samples = tone(0.5, 16000, 300, 4)
    samples[100] = 1.3  # a resampling overshoot, not garbage
    sf.write(str(tmp_path / "loud.wav"), samples, 16000, subtype="FLOAT")
    data = write_data_dir(tmp_path / "train", {"s-1": tmp_path / "loud.wav"}, {"s-1": "loud"})
    assert main(["s2t", "--data-dirs", f"train={data}", "--out-dir", str(tmp_path / "out"), "--unit", "char"]) == 0
    assert np.isfinite(np.load(tmp_path / "out" / "fbank80" / "train" / "s-1.npy")).all()


@pytest.mark.parametrize("name, line", [("text", 2), ("wav.scp", 1)])
def test_latin1_kaldi_file_names_file_line_and_byte(name, line, tmp_path, capsys):
    wav = write_wav(tmp_path / "a.wav", tone(0.5, 16000, 300, 3), 16000)
    data = write_data_dir(tmp_path / "train", {"s-1": wav, "s-2": wav}, {"s-1": "one", "s-2": "two"})
    latin1 = {"text": "s-1 one\ns-2 gr\u00fc\u00dfe\n", "wav.scp": f"s-1 {tmp_path}/\u00e4.wav\ns-2 {wav}\n"}
    (data / name).write_bytes(latin1[name].encode("latin-1"))
    offset = latin1[name].encode("latin-1").index(b"\xfc" if name == "text" else b"\xe4")
    assert main(["s2t", "--data-dirs", f"train={data}", "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert f"{data / name}, line {line}: not UTF-8 text: byte 0x{'fc' if name == 'text' else 'e4'} at byte " \
        f"offset {offset} " in err[0]


def test_utf8_bom_is_not_part_of_the_first_utterance_id(tmp_path):
    wav = write_wav(tmp_path / "a.wav", tone(0.5, 16000, 300, 3), 16000)
    data = write_data_dir(tmp_path / "train", {"s-1": wav}, {"s-1": "one"})
    for name in KALDI_INPUT_FILES:
        (data / name).write_bytes(b"\xef\xbb\xbf" + (data / name).read_bytes())
    assert [utt.utt_id for utt in read_data_dir(data)] == ["s-1"]
    assert main(["s2t", "--data-dirs", f"train={data}", "--out-dir", str(tmp_path / "out"), "--unit", "char"]) == 0
    assert [row["id"] for row in read_tsv(tmp_path / "out" / "train.tsv")] == ["s-1"]


def test_ids_without_audio_or_transcript_are_listed(tmp_path, capsys):
    wav = write_wav(tmp_path / "a.wav", tone(0.5, 16000, 300, 3), 16000)
    audio = {"u-00": wav, "u-extra": wav}
    texts = {"u-00": "zero", **{f"u-{i:02d}": "text" for i in range(1, 13)}}
    data = write_data_dir(tmp_path / "train", audio, texts, {u: "s" for u in set(audio) | set(texts)})
    assert main(["s2t", "--data-dirs", f"train={data}", "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"12 transcripts in {data / 'text'} have no audio in {data / 'wav.scp'}: u-01, u-02," in err
    assert "u-10, ... (2 more)" in err
    assert f"1 audio files in {data / 'wav.scp'} have no transcript in {data / 'text'}: u-extra" in err


def test_piped_wav_scp_is_refused(tmp_path, capsys):
    data = tmp_path / "train"
    data.mkdir()
    (data / "wav.scp").write_text("u-1 sox in.flac -t wav - |\n")
    (data / "text").write_text("u-1 hello\n")
    (data / "utt2spk").write_text("u-1 s\n")
    assert main(["s2t", "--data-dirs", f"train={data}", "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(data / "wav.scp") in err and "piped commands are not supported" in err


def test_speed_factors_must_include_one(corpus, tmp_path, capsys):
    argv = ["s2t", "--data-dirs", f"train={corpus['train']}", "--out-dir", str(tmp_path)]
    assert main([*argv, "--speed-perturb", "0.9"]) == 2
    assert "including 1.0 (the original audio)" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------
# the stock speech_to_text task on the result
# ------------------------------------------------------------------------------------------------------
def stock_task_args(data: Path, config_yaml: str = "config.yaml"):
    parser = options.get_training_parser()
    return options.parse_args_and_arch(
        parser,
        [str(data), "--task", "speech_to_text", "--arch", "s2t_transformer_xs", "--config-yaml", config_yaml],
    )


def test_stock_speech_to_text_task_loads_the_data(prepared):
    out_dir, _ = prepared
    task = tasks.setup_task(stock_task_args(out_dir))
    task.load_dataset("train")
    dataset = task.dataset("train")
    assert "SpecAugmentTransform" in repr(dataset.feature_transforms)
    batches = task.get_batch_iterator(dataset, max_sentences=4, max_positions=(6000, 1024), seed=1)
    batch = next(iter(batches.next_epoch_itr(shuffle=False)))
    features = batch["net_input"]["src_tokens"]
    assert features.dim() == 3 and features.shape[0] == 4 and features.shape[2] == 80
    assert features.shape[1] == int(batch["net_input"]["src_lengths"].max())
    assert (batch["target"] != task.target_dictionary.unk()).all()


def write_config_with(out_dir: Path, name: str, **changes: str) -> Path:
    """A copy of the produced config.yaml named ``name`` with ``<section>__<field>=value`` changes."""
    config = yaml.safe_load((out_dir / "config.yaml").read_text())
    for key, value in changes.items():
        section, field = key.split("__")
        config[section][field] = value
    (out_dir / name).write_text(yaml.safe_dump(config))
    return out_dir / name


def test_missing_cmvn_stats_fail_clearly_in_the_stock_task(prepared):
    out_dir, _ = prepared
    missing = out_dir / "no_such_stats.npz"
    config = write_config_with(out_dir, "config_no_cmvn.yaml", global_cmvn__stats_npz_path=str(missing))
    with pytest.raises(FileNotFoundError) as error:
        tasks.setup_task(stock_task_args(out_dir, config.name))
    assert str(error.value) == (
        f"{config} names missing files: global_cmvn.stats_npz_path: {missing} does not exist"
    )


def test_missing_files_are_all_listed_with_a_hint_for_relative_cmvn_paths(prepared, tmp_path, monkeypatch):
    out_dir, _ = prepared
    config = write_config_with(
        out_dir, "config_relative.yaml",
        global_cmvn__stats_npz_path="global_cmvn.npz", bpe_tokenizer__sentencepiece_model="gone.model",
    )
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as error:
        check_s2t_data_config(config, out_dir)
    message = str(error.value)
    assert "bpe_tokenizer.sentencepiece_model: gone.model does not exist" in message
    relative = "global_cmvn.stats_npz_path: global_cmvn.npz does not exist (relative to the current directory"
    assert f"{relative} {tmp_path}; fairseq opens it as given" in message
    assert f"not under {out_dir}: write it as an absolute path" in message


def test_fairseq_train_with_user_dir_reports_missing_cmvn_stats(prepared):
    out_dir, _ = prepared
    config = write_config_with(out_dir, "config_no_stats.yaml", global_cmvn__stats_npz_path="/no/stats.npz")
    result = run_cli(
        [
            "fairseq-train", out_dir, "--task", "speech_to_text", "--config-yaml", config.name,
            "--user-dir", USER_DIR, "--arch", "s2t_transformer_xs",
            "--criterion", "label_smoothed_cross_entropy",
            "--optimizer", "adam", "--lr", "1e-3", "--max-tokens", "4000", "--max-update", "1",
            "--train-subset", "train", "--valid-subset", "dev", "--save-dir", out_dir / "ckpt", "--cpu",
        ],
        timeout=120,
    )
    assert result.returncode != 0
    expected = f"{config} names missing files: global_cmvn.stats_npz_path: /no/stats.npz does not exist"
    assert f"FileNotFoundError: {expected}" in result.stderr, cli_output(result)


def test_char_units_cover_every_character_of_the_transcripts(tmp_path):
    texts = ["今天 天气 很好", "我们 去 公园", "abc"]
    settings = S2TOptions(unit="char", vocab_size=500).sentencepiece_settings()
    model = train_sentencepiece(tmp_path / spm_prefix("char", 500), settings, sentences=texts)
    assert model.name == "spm_char.model"
    write_fairseq_vocab(model, tmp_path / "spm_char.txt")
    pieces = {line.split(" ")[0] for line in (tmp_path / "spm_char.txt").read_text(encoding="utf-8").splitlines()}
    assert set("".join(texts).replace(" ", "")) <= pieces
