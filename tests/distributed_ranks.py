"""Train on two CPU ranks with fairseq's own launcher and read back every rank's final state (tests only).

fairseq saves checkpoints on rank 0 alone, so whether the ranks agree (weights, sparsity masks, any
task state) cannot be read from its output. :func:`train_on_two_ranks` runs ``fairseq-train``'s own
``cli_main`` through this file as a script, ``python tests/distributed_ranks.py OUT_DIR <fairseq-train
args>``, with one change made in that process tree only: the function that fairseq's
``call_main`` starts in each rank is :func:`train_and_dump`, which runs ``fairseq_cli.train.main``
unchanged and then writes ``OUT_DIR/rank<r>.pt``. Each file holds a dict::

    {"rank": r, "model": model.state_dict(), "task": task.state_dict(),
     "sample_ids": ids of the training sentences this rank stepped on, in order,
     "all_sample_ids": every rank's "sample_ids", in rank order, as fairseq's all_gather_list gave them}

Use (the plugin's own tests, e.g. for sparsity masks)::

    from distributed_ranks import train_on_two_ranks
    states = train_on_two_ranks([data, "--user-dir", USER_DIR, "--task", "translation_accel",
                                 *TINY_TRANSFORMER, *TINY_TRAIN, "--max-update", "3",
                                 "--save-dir", tmp_path / "ckpt"], tmp_path / "ranks")
    rank0, rank1 = states
    assert rank0["task"] == rank1["task"]

Pass ``--cpu`` and no ``--distributed-world-size`` (2 is added). :func:`run_ranks` and
:func:`rank_states` are the two halves, for tests that check the log or a failure.
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Union

import torch

from conftest import cli_output, run_cli

StrPath = Union[str, os.PathLike]
WORLD_SIZE = 2


def state_file(out_dir: StrPath, rank: int) -> Path:
    return Path(out_dir) / f"rank{rank}.pt"


def train_and_dump(out_dir: str, cfg: Any, **kwargs: Any) -> None:
    """One rank: fairseq-train's ``main``, then this rank's model and task state to ``out_dir``."""
    from fairseq.distributed import utils as distributed_utils
    from fairseq_cli import train

    trainers: List[Any] = []

    class RecordingTrainer(train.Trainer):
        """fairseq's Trainer that remembers itself and the sentence ids it trains on."""

        def __init__(self, *args: Any, **trainer_kwargs: Any) -> None:
            super().__init__(*args, **trainer_kwargs)
            self.sample_ids: List[int] = []
            trainers.append(self)

        def train_step(self, samples: List[Dict[str, Any]], *args: Any, **step_kwargs: Any) -> Any:
            self.sample_ids.extend(int(i) for sample in samples if sample for i in sample["id"])
            return super().train_step(samples, *args, **step_kwargs)

    train.Trainer = RecordingTrainer
    train.main(cfg, **kwargs)
    (trainer,) = trainers
    rank = torch.distributed.get_rank()
    state = {"rank": rank, "model": trainer.get_model().state_dict(), "task": trainer.task.state_dict(),
             "sample_ids": trainer.sample_ids,
             "all_sample_ids": distributed_utils.all_gather_list(trainer.sample_ids)}
    torch.save(state, state_file(out_dir, rank))


def dumping_ranks(call_main: Callable[..., None], out_dir: str) -> Callable[..., None]:
    """Wrap fairseq's ``call_main`` to start :func:`train_and_dump` in the ranks instead of ``main``."""

    @functools.wraps(call_main)
    def wrapper(cfg: Any, main: Callable[..., None], **kwargs: Any) -> None:
        call_main(cfg, functools.partial(train_and_dump, out_dir), **kwargs)

    return wrapper


def script_main(argv: Sequence[str]) -> None:
    """``distributed_ranks.py OUT_DIR ARGS...``: ``fairseq-train ARGS...`` with every rank dumping."""
    out_dir, *fairseq_args = argv
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    import fairseq_accel.plugin  # noqa: F401  (installs the plugin's call_main first: ours must wrap it)
    from fairseq.distributed import utils as distributed_utils
    from fairseq_cli import train

    distributed_utils.call_main = dumping_ranks(distributed_utils.call_main, out_dir)
    sys.argv = ["fairseq-train", *fairseq_args]
    train.cli_main()


def run_ranks(args: Sequence[StrPath], out_dir: StrPath) -> subprocess.CompletedProcess:
    """Run ``fairseq-train ARGS --distributed-world-size 2`` with every rank writing its state file."""
    return run_cli([sys.executable, Path(__file__), out_dir, *args, "--distributed-world-size", str(WORLD_SIZE)])


def rank_states(out_dir: StrPath) -> List[Dict[str, Any]]:
    """The state files of ranks 0 and 1, in rank order."""
    # weights_only=False: task states may hold any picklable value, and these files are the test's own
    return [torch.load(state_file(out_dir, rank), weights_only=False) for rank in range(WORLD_SIZE)]


def train_on_two_ranks(args: Sequence[StrPath], out_dir: StrPath) -> List[Dict[str, Any]]:
    """Train with ``args`` on two CPU ranks (assert it succeeded); return each rank's final state."""
    result = run_ranks(args, out_dir)
    assert result.returncode == 0, cli_output(result)
    return rank_states(out_dir)


if __name__ == "__main__":
    import distributed_ranks  # spawned ranks unpickle train_and_dump from this module name

    distributed_ranks.script_main(sys.argv[1:])
