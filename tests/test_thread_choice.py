"""--accel-threads (fairseq_accel/inference/thread_choice.py): auto measures torch's thread count against 1 thread
on two batches each after the first, in turn, keeps the faster and says so once, measures again when the kept one slows down 3x;
a fixed count or `torch` leaves nothing to measure; torch's own count comes back after every batch; bad values
and the option without the fast generator are one-line errors; and fairseq-generate says what auto chose."""
import logging
import re
from pathlib import Path

import pytest
import torch

from conftest import USER_DIR, cli_output, run_cli
from fairseq_accel.inference import thread_choice
from fairseq_accel.inference.thread_choice import ThreadChooser, parse_accel_threads
from fairseq_accel.tasks.accel_generation import AccelGenerationConfig, AccelGenerationError, build_accel_generator


class LoadedMachine:
    """A clock for ThreadChooser: a batch of ``rows`` rows takes ``per_row[threads]`` seconds per row."""

    def __init__(self, per_row: dict):
        self.per_row, self.now, self.seen = per_row, 0.0, []

    def perf_counter(self) -> float:
        return self.now

    def decode(self, rows: int = 100):
        def run():
            threads = torch.get_num_threads()
            self.seen.append(threads)
            self.now += rows * self.per_row[threads]
            return f"batch at {threads}", rows
        return run


@pytest.fixture
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def test_auto_keeps_the_faster_and_gives_torch_its_count_back(two_threads, monkeypatch, caplog) -> None:
    machine = LoadedMachine({2: 30e-3, 1: 1e-3})  # another process on the second core: 2 threads 30x slower
    monkeypatch.setattr(thread_choice, "time", machine)
    chooser = ThreadChooser("auto")
    with caplog.at_level(logging.INFO, logger=thread_choice.__name__):
        results = [chooser.run(machine.decode()) for _ in range(7)]
    assert machine.seen == [2, 2, 1, 2, 1, 1, 1] and results[0] == "batch at 2"  # warm-up, in turn, the choice
    assert torch.get_num_threads() == 2  # the caller's count after every batch
    lines = [r.message for r in caplog.records if r.message.startswith("--accel-threads auto")]
    assert lines == ["--accel-threads auto: decoding with 1 thread (per hypothesis and step, "
                     "2 threads: 30000 us, 1 thread: 1000 us)"]


def test_auto_measures_again_when_the_load_changes(two_threads, monkeypatch) -> None:
    machine = LoadedMachine({2: 30e-3, 1: 1e-3})
    monkeypatch.setattr(thread_choice, "time", machine)
    chooser = ThreadChooser("auto")
    for _ in range(6):
        chooser.run(machine.decode())
    machine.per_row = {2: 0.5e-3, 1: 4e-3}  # the other process ended, ours got slower at 1 thread (4x)
    for _ in range(6):
        chooser.run(machine.decode())
    # the slow batch starts a new measurement; 2 threads win it
    assert machine.seen == [2, 2, 1, 2, 1, 1, 1, 2, 1, 2, 1, 2]
    assert chooser.chosen == 2


def test_auto_keeps_torch_count_unless_one_thread_is_clearly_faster(two_threads, monkeypatch) -> None:
    for per_row, kept in (({2: 1.05e-3, 1: 1e-3}, 2), ({2: 1.2e-3, 1: 1e-3}, 1)):  # within / beyond thread_choice.MARGIN
        machine = LoadedMachine(per_row)
        monkeypatch.setattr(thread_choice, "time", machine)
        chooser = ThreadChooser("auto")
        for _ in range(6):
            chooser.run(machine.decode())
        assert chooser.chosen == kept, per_row


def test_fixed_counts_and_torch(two_threads, monkeypatch) -> None:
    machine = LoadedMachine({2: 1e-3, 1: 1e-3})
    monkeypatch.setattr(thread_choice, "time", machine)
    for setting, expected in (("1", [1, 1]), ("torch", [2, 2])):
        machine.seen = []
        chooser = ThreadChooser(setting)
        chooser.run(machine.decode())
        chooser.run(machine.decode())
        assert machine.seen == expected and torch.get_num_threads() == 2
    torch.set_num_threads(1)
    assert ThreadChooser("auto").candidates == []  # one thread allowed: nothing to choose


@pytest.mark.parametrize("value", ["0", "-2", "many", ""])
def test_bad_values_are_one_line_errors(value: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"--accel-threads must be auto, torch") + ".*" + re.escape(repr(value))):
        parse_accel_threads(value)
    with pytest.raises(AccelGenerationError, match="--accel-threads must be") as error:
        build_accel_generator(None, [], AccelGenerationConfig(accel_generator="fast", accel_threads=value))
    assert "\n" not in str(error.value)
    with pytest.raises(AccelGenerationError, match="--accel-threads apply to the fast generator"):
        build_accel_generator(None, [], AccelGenerationConfig(accel_threads="2"))


def test_fairseq_generate_says_what_auto_chose(tiny_translation_data: Path, tmp_path: Path) -> None:
    """An untrained tiny model (the choice does not depend on what it decodes), 2 threads allowed."""
    train = run_cli(["fairseq-train", tiny_translation_data, "--user-dir", USER_DIR, "--task", "translation_accel",
                     "--arch", "transformer", "--encoder-layers", "1", "--decoder-layers", "1",
                     "--encoder-embed-dim", "32", "--decoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64",
                     "--decoder-ffn-embed-dim", "64", "--encoder-attention-heads", "2", "--decoder-attention-heads",
                     "2", "--optimizer", "adam", "--lr", "1e-3", "--max-tokens", "500", "--max-update", "1", "--cpu",
                     "--save-dir", tmp_path, "--num-workers", "0", "--no-epoch-checkpoints", "--disable-validation"])
    assert train.returncode == 0, cli_output(train)
    result = run_cli(["fairseq-generate", tiny_translation_data, "--user-dir", USER_DIR, "--task", "translation_accel",
                      "--path", tmp_path / "checkpoint_last.pt", "--batch-size", "8", "--cpu", "--num-workers", "0",
                      "--beam", "2", "--max-len-b", "5", "--accel-generator", "fast"], env={"OMP_NUM_THREADS": "2"})
    assert result.returncode == 0, cli_output(result)
    lines = [line for line in result.stderr.splitlines() if "--accel-threads auto: decoding with" in line]
    assert len(lines) == 1 and re.search(r"2 threads: \d+ us, 1 thread: \d+ us\)$", lines[0]), cli_output(result)
