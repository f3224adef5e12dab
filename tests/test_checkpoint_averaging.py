"""fairseq-accel-average: the mean of the last N checkpoints of a run, decodable by fairseq-generate, and one
clear line for inputs that cannot be averaged (too few, another model, masks still changing, ADMM)."""
import subprocess
from pathlib import Path
from typing import Dict, List

import pytest
import torch

from conftest import TINY_TRAIN, TINY_TRANSFORMER, USER_DIR, cli_output, run_cli
from fairseq_accel.cli.average import main as average_main
from fairseq_accel.compat.checkpoint_loading import read_checkpoint

# TINY_TRAIN, keeping one checkpoint per epoch; 200-token batches: 14 updates per epoch of the toy corpus.
EPOCH_TRAIN = [*(option for option in TINY_TRAIN if option != "--no-epoch-checkpoints"), "--save-interval", "1"]
TRAIN = ["--user-dir", USER_DIR, "--task", "translation_accel", *TINY_TRANSFORMER, *EPOCH_TRAIN,
         "--max-tokens", "200", "--max-epoch", "3"]


def train(data: Path, save_dir: Path, *options: str) -> Path:
    result = run_cli(["fairseq-train", data, *TRAIN, "--save-dir", save_dir, *options])
    assert result.returncode == 0, cli_output(result)
    return save_dir


def average(*args: object) -> subprocess.CompletedProcess:
    return run_cli(["fairseq-accel-average", *args])


def refused(capsys: pytest.CaptureFixture, *args: object) -> str:
    """The one stderr line of an averaging run (the console script's main, in this process) that must fail."""
    capsys.readouterr()
    assert average_main([str(arg) for arg in args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("fairseq-accel-average: error: "), lines
    return lines[-1]


@pytest.fixture(scope="module")
def epochs(tiny_translation_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three epoch checkpoints of one tiny transformer run."""
    return train(tiny_translation_data, tmp_path_factory.mktemp("averaging") / "checkpoints")


def models(paths: List[Path]) -> List[Dict[str, torch.Tensor]]:
    return [read_checkpoint(str(path))["model"] for path in paths]


def test_average_of_the_last_epochs_decodes(epochs: Path, tiny_translation_data: Path, tmp_path: Path) -> None:
    output = tmp_path / "average.pt"
    result = average("--inputs", epochs, "--num-epoch-checkpoints", "2", "--output", output)
    assert result.returncode == 0, cli_output(result)
    assert "averaged 2 checkpoints (checkpoint2.pt ... checkpoint3.pt)" in result.stdout
    inputs = models([epochs / f"checkpoint{epoch}.pt" for epoch in (2, 3)])
    state = read_checkpoint(str(output))
    assert state["model"].keys() == inputs[0].keys()
    for name, tensor in state["model"].items():
        expected = sum(model[name].double() for model in inputs) / 2
        assert torch.allclose(tensor.double(), expected, atol=1e-6), name
    assert not torch.equal(inputs[0]["encoder.layers.0.fc1.weight"], inputs[1]["encoder.layers.0.fc1.weight"])
    newest = read_checkpoint(str(epochs / "checkpoint3.pt"))
    assert state["extra_state"]["train_iterator"] == newest["extra_state"]["train_iterator"]
    assert [Path(p).name for p in state["extra_state"]["averaged_checkpoints"]] == [
        "checkpoint2.pt", "checkpoint3.pt"]

    generated = run_cli(["fairseq-generate", tiny_translation_data, "--user-dir", USER_DIR, "--path", output,
                         "--gen-subset", "test", "--beam", "2", "--cpu", "--batch-size", "16"])
    assert generated.returncode == 0, cli_output(generated)
    assert sum(line.startswith("H-") for line in generated.stdout.splitlines()) == 40


def test_given_files_and_the_upper_bound(epochs: Path, tmp_path: Path) -> None:
    """Explicit files average exactly those; --checkpoint-upper-bound leaves out the later epochs."""
    assert average_main(["--inputs", str(epochs / "checkpoint1.pt"), str(epochs / "checkpoint2.pt"),
                         "--output", str(tmp_path / "a.pt")]) == 0
    assert average_main(["--inputs", str(epochs), "--num-epoch-checkpoints", "2", "--checkpoint-upper-bound", "2",
                         "--output", str(tmp_path / "b.pt")]) == 0
    first, second = (read_checkpoint(str(tmp_path / name))["model"] for name in ("a.pt", "b.pt"))
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_bad_inputs_are_one_line(epochs: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert refused(capsys, "--inputs", epochs, "--num-epoch-checkpoints", "6", "--output", tmp_path / "x.pt") == (
        f"fairseq-accel-average: error: {epochs}: 3 epoch checkpoints (checkpoint(\\d+)\\.pt), 6 asked; save them "
        "with fairseq-train without --no-epoch-checkpoints, with --keep-last-epochs N")
    assert "0 update checkpoints" in refused(capsys, "--inputs", epochs, "--num-update-checkpoints", "2",
                                             "--output", tmp_path / "x.pt")
    assert "not found" in refused(capsys, "--inputs", tmp_path / "missing.pt", "--output", tmp_path / "x.pt")
    wider = read_checkpoint(str(epochs / "checkpoint1.pt"))
    wider["model"]["encoder.layers.0.fc1.weight"] = torch.zeros(48, 16)
    torch.save(wider, tmp_path / "wider.pt")
    line = refused(capsys, "--inputs", epochs / "checkpoint1.pt", tmp_path / "wider.pt", "--output", tmp_path / "x.pt")
    assert "parameter encoder.layers.0.fc1.weight is torch.float32 [48, 16]" in line and "[32, 16]" in line
    assert not (tmp_path / "x.pt").exists()


def test_pruned_checkpoints_average_only_once_the_masks_are_final(tiny_translation_data: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    """Masks still changing between the inputs: refused. Same final masks: the average keeps their zeros."""
    pruned = train(tiny_translation_data, tmp_path / "pruned", "--sparsity-target", "0.5",
                   "--sparsity-end-update", "20", "--sparsity-frequency", "4")
    # masks final at update 20: checkpoint1.pt (update 14) has others than checkpoint2.pt and 3 (28, 42)
    assert "sparsity masks differ" in refused(capsys, "--inputs", pruned, "--num-epoch-checkpoints", "3",
                                              "--output", tmp_path / "x.pt")
    assert average_main(["--inputs", str(pruned), "--num-epoch-checkpoints", "2", "--output", str(tmp_path / "pruned.pt")]) == 0
    weight = read_checkpoint(str(tmp_path / "pruned.pt"))["model"]["encoder.layers.0.fc1.weight"]
    assert (weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.02)

    quantized = train(tiny_translation_data, tmp_path / "admm", "--admm-bits", "8", "--admm-start-update", "1",
                      "--max-epoch", "1")
    assert "ADMM-quantized weights" in refused(capsys, "--inputs", quantized, "--num-epoch-checkpoints", "1",
                                               "--output", tmp_path / "x.pt")
