"""Checkpoints of the accel tasks remember their vocabularies; decoding with others is one clear error.

Trained for a few updates with the real fairseq-train, decoded with the real fairseq-generate on a copy
of the data whose dictionary (or sentencepiece model) was reordered or resized.
"""
import shutil
from pathlib import Path
from typing import List

import pytest
import sentencepiece as spm

from conftest import TINY_TRAIN, TINY_TRANSFORMER, USER_DIR, cli_output, run_cli
from test_joint_ctc_attention import TINY_S2T, write_tiny_speech_data

ERROR = "fairseq_accel.tasks.vocabulary_check.VocabularyMismatchError: "


def train_translation(data: Path, save_dir: Path, task: str) -> Path:
    train = run_cli(["fairseq-train", data, "--user-dir", USER_DIR, "--task", task, *TINY_TRANSFORMER,
                     *TINY_TRAIN, "--max-update", "3", "--save-dir", save_dir])
    assert train.returncode == 0, cli_output(train)
    return save_dir / "checkpoint_last.pt"


@pytest.fixture(scope="module")
def accel_checkpoint(tiny_translation_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_translation(tiny_translation_data, tmp_path_factory.mktemp("fingerprint_accel"), "translation_accel")


def generate(data: Path, checkpoint: Path):
    return run_cli(["fairseq-generate", data, "--user-dir", USER_DIR, "--task", "translation_accel",
                    "--path", checkpoint, "--batch-size", "16", "--beam", "2", "--cpu", "--num-workers", "0"])


def edited_copy(data: Path, destination: Path, file_name: str, edit) -> Path:
    """A copy of the data folder whose ``file_name`` lines went through ``edit``."""
    shutil.copytree(data, destination)
    lines: List[str] = (destination / file_name).read_text(encoding="utf-8").splitlines(keepends=True)
    (destination / file_name).write_text("".join(edit(lines)), encoding="utf-8")
    return destination


def swap_first_two(lines: List[str]) -> List[str]:
    return [lines[1], lines[0], *lines[2:]]


def refusal(result) -> str:
    """The one-line error of a run that failed on a vocabulary mismatch."""
    assert result.returncode != 0, cli_output(result)
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(ERROR), cli_output(result)
    return last


def test_untouched_dictionary_decodes(accel_checkpoint: Path, tiny_translation_data: Path) -> None:
    result = generate(tiny_translation_data, accel_checkpoint)
    assert result.returncode == 0, cli_output(result)
    assert sum(line.startswith("H-") for line in result.stdout.splitlines()) == 40


def test_reordered_dictionary_is_refused(accel_checkpoint: Path, tiny_translation_data: Path, tmp_path: Path) -> None:
    data = edited_copy(tiny_translation_data, tmp_path / "data", "dict.tgt.txt", swap_first_two)
    trained_with = (tiny_translation_data / "dict.tgt.txt").read_text(encoding="utf-8").split()
    first, second = trained_with[0], trained_with[2]  # "word count" lines: the first two words
    line = refusal(generate(data, accel_checkpoint))
    assert f"target dictionary {data / 'dict.tgt.txt'} " in line and f"({tiny_translation_data / 'dict.tgt.txt'})" in line
    # fairseq puts 4 special symbols before the file's words
    assert line.endswith(f"symbol 4 is {second!r} in it but {first!r} in the checkpoint's"), line


def test_resized_dictionary_is_refused(accel_checkpoint: Path, tiny_translation_data: Path, tmp_path: Path) -> None:
    data = edited_copy(tiny_translation_data, tmp_path / "data", "dict.src.txt", lambda lines: [*lines, "extra 1\n"])
    line = refusal(generate(data, accel_checkpoint))
    assert f"source dictionary {data / 'dict.src.txt'} " in line and f"({tiny_translation_data / 'dict.src.txt'})" in line
    assert "symbols, the checkpoint's has" in line, line


def test_restore_file_with_a_reordered_dictionary_is_refused(accel_checkpoint: Path, tiny_translation_data: Path,
                                                            tmp_path: Path) -> None:
    """fairseq-train --restore-file resumes a checkpoint: another dictionary there is refused as in decoding."""
    data = edited_copy(tiny_translation_data, tmp_path / "data", "dict.tgt.txt", swap_first_two)
    resume = ["fairseq-train", "--user-dir", USER_DIR, "--task", "translation_accel", *TINY_TRANSFORMER, *TINY_TRAIN,
              "--max-update", "4", "--restore-file", accel_checkpoint]
    line = refusal(run_cli([resume[0], data, *resume[1:], "--save-dir", tmp_path / "resumed"]))
    assert f"target dictionary {data / 'dict.tgt.txt'} " in line, line
    same = run_cli([resume[0], tiny_translation_data, *resume[1:], "--save-dir", tmp_path / "same"])
    assert same.returncode == 0, cli_output(same)
    assert "@ 3 updates)" in same.stdout + same.stderr, cli_output(same)  # "Loaded checkpoint ... (epoch 1 @ 3 updates)"


def test_stock_checkpoint_is_not_checked(tiny_translation_data: Path, tmp_path: Path) -> None:
    """A checkpoint of fairseq's own translation task stores no vocabularies: it decodes as before."""
    checkpoint = train_translation(tiny_translation_data, tmp_path / "stock", "translation")
    data = edited_copy(tiny_translation_data, tmp_path / "data", "dict.tgt.txt", swap_first_two)
    result = generate(data, checkpoint)
    assert result.returncode == 0, cli_output(result)


# --------------------------------------------------------------------------------------------
# speech_to_text_accel: the target vocabulary and the sentencepiece model of the data config
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def speech_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_speech_data(tmp_path_factory.mktemp("fingerprint_speech"))


@pytest.fixture(scope="module")
def speech_checkpoint(speech_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    save_dir = tmp_path_factory.mktemp("fingerprint_speech_checkpoints")
    train = run_cli([
        "fairseq-train", speech_data, "--user-dir", USER_DIR, "--task", "speech_to_text_accel",
        "--config-yaml", "config.yaml", "--train-subset", "train", "--valid-subset", "dev", *TINY_S2T,
        "--criterion", "label_smoothed_cross_entropy", "--optimizer", "adam", "--lr", "1e-3",
        "--max-tokens", "4000", "--max-update", "1", "--cpu", "--num-workers", "0", "--seed", "1",
        "--save-dir", save_dir, "--no-epoch-checkpoints", "--disable-validation",
    ])
    assert train.returncode == 0, cli_output(train)
    return save_dir / "checkpoint_last.pt"


def generate_speech(data: Path, checkpoint: Path):
    return run_cli([
        "fairseq-generate", data, "--user-dir", USER_DIR, "--task", "speech_to_text_accel",
        "--config-yaml", "config.yaml", "--gen-subset", "test", "--path", checkpoint,
        "--max-tokens", "4000", "--beam", "2", "--max-len-b", "5", "--cpu",
    ])


def test_speech_vocabulary_checked(speech_checkpoint: Path, speech_data: Path, tmp_path: Path) -> None:
    untouched = generate_speech(speech_data, speech_checkpoint)
    assert untouched.returncode == 0, cli_output(untouched)
    data = edited_copy(speech_data, tmp_path / "data", "spm_char.txt", swap_first_two)
    line = refusal(generate_speech(data, speech_checkpoint))
    assert f"target vocabulary {data / 'spm_char.txt'} " in line and f"({speech_data / 'spm_char.txt'})" in line


def test_speech_sentencepiece_model_checked(speech_checkpoint: Path, speech_data: Path, tmp_path: Path) -> None:
    """Another sentencepiece model with the same fairseq vocabulary file still maps pieces to other text."""
    data = edited_copy(speech_data, tmp_path / "data", "spm_text.txt", lambda lines: [l.upper() for l in lines])
    spm.SentencePieceTrainer.train(
        input=str(data / "spm_text.txt"), model_prefix=str(data / "spm_char"), model_type="char", vocab_size=1000,
        hard_vocab_limit=False, bos_id=-1, eos_id=-1, unk_id=0, minloglevel=2,
    )
    line = refusal(generate_speech(data, speech_checkpoint))
    assert f"sentencepiece model {data / 'spm_char.model'} " in line and f"({speech_data / 'spm_char.model'})" in line
