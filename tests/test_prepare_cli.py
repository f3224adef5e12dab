"""``fairseq-accel-prepare`` as a whole: output folders that are files, the ``spm`` subcommand that the NMT
recipes use (same sentencepiece settings as before it moved into the package), and recipes that enter
the package only through console scripts."""
import argparse
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm

from conftest import REPO_ROOT
from fairseq_accel.cli.prepare import build_parser, main

# A complete command line for every subcommand with an --out-dir, the folder given as OUT.
OUT_DIR_COMMANDS = {
    "gettext": ["gettext", "--out-dir", "OUT"],
    "iwslt14": ["iwslt14", "--orig-dir", "missing", "--out-dir", "OUT"],
    "s2t": ["s2t", "--data-dirs", "train=missing", "--out-dir", "OUT"],
    "espeak": ["espeak", "--out-dir", "OUT"],
    "aishell": ["aishell", "--aishell-dir", "missing", "--out-dir", "OUT"],
}
WORDS = "the a file folder open save close window print copy paste undo redo help new name".split()


def subcommands_with_out_dir() -> set:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {
        name for name, sub in commands.choices.items()
        if any("--out-dir" in action.option_strings for action in sub._actions)
    }


def test_every_out_dir_subcommand_is_checked_below():
    assert subcommands_with_out_dir() == set(OUT_DIR_COMMANDS)


@pytest.mark.parametrize("command", sorted(OUT_DIR_COMMANDS))
@pytest.mark.parametrize("below", [False, True], ids=["file", "folder_in_file"])
def test_out_dir_that_is_a_file_gives_one_line(command, below, tmp_path, capsys):
    existing = tmp_path / "existing"
    existing.write_text("keep me\n")
    out_dir = existing / "sub" if below else existing
    argv = [str(out_dir) if arg == "OUT" else arg for arg in OUT_DIR_COMMANDS[command]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"fairseq-accel-prepare: error: --out-dir: {existing} is an existing file; expected a folder"]
    assert existing.read_text() == "keep me\n"


def write_text(path: Path, lines: int, seed: int) -> Path:
    rng = random.Random(seed)
    sentences = (" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9))) for _ in range(lines))
    path.write_text("".join(s.capitalize() + ".\n" for s in sentences), encoding="utf-8")
    return path


@pytest.fixture
def parallel_text(tmp_path):
    return write_text(tmp_path / "train.de", 300, 1), write_text(tmp_path / "train.en", 300, 2)


def test_spm_train_keeps_the_nmt_settings(parallel_text, tmp_path):
    """The same pieces as the recipes' former egs/tools/spm.py: joint BPE on the files, identity
    normalisation, every character covered, sentencepiece's own special ids."""
    assert main(["spm", "train", "--input", *map(str, parallel_text), "--model-prefix", str(tmp_path / "spm" / "m"),
                 "--vocab-size", "80", "--model-type", "bpe"]) == 0
    spm.SentencePieceTrainer.train(
        input=[str(path) for path in parallel_text], model_prefix=str(tmp_path / "reference"), vocab_size=80,
        model_type="bpe", character_coverage=1.0, normalization_rule_name="identity", num_threads=1, minloglevel=2,
    )
    ours = spm.SentencePieceProcessor(model_file=str(tmp_path / "spm" / "m.model"))
    reference = spm.SentencePieceProcessor(model_file=str(tmp_path / "reference.model"))
    assert [ours.id_to_piece(i) for i in range(ours.get_piece_size())] == \
        [reference.id_to_piece(i) for i in range(reference.get_piece_size())]
    assert (ours.unk_id(), ours.bos_id(), ours.eos_id(), ours.pad_id()) == (0, 1, 2, -1)


def test_spm_encode_round_trips_exactly(parallel_text, tmp_path):
    model_prefix = tmp_path / "m"
    assert main(["spm", "train", "--input", *map(str, parallel_text), "--model-prefix", str(model_prefix),
                 "--vocab-size", "80"]) == 0
    text = tmp_path / "test.en"
    text.write_text("Open the ﬁle.\nＦｕｌｌ width\n", encoding="utf-8")  # NFKC would change both lines
    assert main(["spm", "encode", "--model", f"{model_prefix}.model", "--input", str(text),
                 "--output", str(tmp_path / "out" / "test.en")]) == 0
    encoded = (tmp_path / "out" / "test.en").read_text(encoding="utf-8").splitlines()
    assert len(encoded) == 2
    decoded = ["".join(line.split(" ")).replace("▁", " ").lstrip(" ") for line in encoded]
    assert decoded == ["Open the ﬁle.", "Ｆｕｌｌ width"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--input", "nope.txt", "--model-prefix", "m", "--vocab-size", "80"],
         "sentencepiece training text not found: nope.txt"),
        (["train", "--input", "TEXT", "--model-prefix", "m", "--vocab-size", "100000"],
         "sentencepiece cannot train a bpe model of 100000 pieces on the lines of TEXT: "),
        (["encode", "--model", "nope.model", "--input", "TEXT", "--output", "o"],
         "sentencepiece model nope.model not found"),
        (["encode", "--model", "TEXT", "--input", "TEXT", "--output", "o"], "TEXT is not a sentencepiece model"),
    ],
)
def test_spm_errors_are_one_line(argv, message, parallel_text, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = str(parallel_text[0])
    assert main(["spm", *[text if arg == "TEXT" else arg for arg in argv]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fairseq-accel-prepare: error: " + message.replace("TEXT", text)), err


def test_recipes_enter_the_package_only_through_console_scripts():
    """No `python -m fairseq_accel...`, no scripts/*.py and no removed helper in any recipe script."""
    offending = []
    for script in sorted((REPO_ROOT / "egs").rglob("*.sh")):
        for number, line in enumerate(script.read_text().splitlines(), 1):
            if re.search(r"python3? -m |scripts/\w+\.py|fairseq_accel\.cli|egs/tools/spm\.py|/spm\.py", line):
                offending.append(f"{script.relative_to(REPO_ROOT)}:{number}: {line.strip()}")
    assert offending == []


@pytest.mark.parametrize("module", ["fairseq_accel.cli.prepare", "fairseq_accel.cli.average"])
def test_data_commands_start_without_fairseq(module):
    """Data preparation and checkpoint averaging run many times per recipe: importing their CLI must not
    import fairseq (~3 s here) nor, for data preparation, torch or scipy.signal (resampling imports it when
    it first runs)."""
    heavy = {"fairseq", "scipy.signal"} | ({"torch"} if module.endswith("prepare") else set())
    code = f"import sys, {module}; print(sorted(set({sorted(heavy)!r}).intersection(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr
