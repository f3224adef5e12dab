"""fairseq's own multi-process training on CPU (fairseq_accel/compat/cpu_distributed.py).

Stock fairseq 0.12 stops ``fairseq-train --cpu --distributed-world-size 2`` with "AssertionError: world
size is 2 but have 0 available devices" and torchrun-launched ranks with a ZeroDivisionError; with the
plugin both train two gloo ranks whose DDP-synchronised weights are identical, and fairseq's
all_gather_list (CUDA buffers in stock fairseq) works between them.
"""
from pathlib import Path

import torch

from conftest import TINY_TRAIN, TINY_TRANSFORMER, USER_DIR, VENV_BIN, cli_output, run_cli
from distributed_ranks import rank_states, run_ranks

ERROR = "fairseq_accel.compat.cpu_distributed.CpuDistributedError: "
GLOO_NOTICE = "CPU training: distributed backend gloo instead of nccl"


def train_args(data: Path, save_dir: Path) -> list:
    return [data, "--user-dir", USER_DIR, "--task", "translation_accel", *TINY_TRANSFORMER, *TINY_TRAIN,
            "--max-update", "3", "--save-dir", save_dir]


def test_two_spawned_ranks_train_identical_weights(tiny_translation_data: Path, tmp_path: Path) -> None:
    result = run_ranks([*train_args(tiny_translation_data, tmp_path / "ckpt"), "--distributed-backend", "nccl"],
                       tmp_path / "ranks")
    assert result.returncode == 0, cli_output(result)
    log = result.stdout + result.stderr
    assert GLOO_NOTICE in log, cli_output(result)
    assert "distributed init (rank 1): tcp://localhost:" in log, cli_output(result)
    rank0, rank1 = rank_states(tmp_path / "ranks")
    assert (rank0["rank"], rank1["rank"]) == (0, 1)
    # the ranks stepped on different sentences, so only synchronised gradients make their weights equal
    assert rank0["sample_ids"] and rank1["sample_ids"] and rank0["sample_ids"] != rank1["sample_ids"]
    # fairseq's all_gather_list (CUDA buffers in stock fairseq) gathers on CPU ranks too
    assert rank0["all_sample_ids"] == rank1["all_sample_ids"] == [rank0["sample_ids"], rank1["sample_ids"]]
    assert rank0["model"].keys() == rank1["model"].keys()
    differing = [name for name, weight in rank0["model"].items() if not torch.equal(weight, rank1["model"][name])]
    assert not differing, differing
    assert rank0["task"] == rank1["task"]
    saved = torch.load(tmp_path / "ckpt" / "checkpoint_last.pt", weights_only=False)["model"]
    assert all(torch.equal(saved[name], weight) for name, weight in rank0["model"].items())


def test_torchrun_launches_cpu_ranks(tiny_translation_data: Path, tmp_path: Path) -> None:
    result = run_cli([VENV_BIN / "torchrun", "--standalone", "--nproc_per_node", "2", VENV_BIN / "fairseq-train",
                      *train_args(tiny_translation_data, tmp_path / "ckpt")])
    assert result.returncode == 0, cli_output(result)
    log = result.stdout + result.stderr
    for rank in (0, 1):
        assert f"distributed init (rank {rank}): env://" in log, cli_output(result)
    assert "training on 2 devices" in log, cli_output(result)
    assert (tmp_path / "ckpt" / "checkpoint_last.pt").is_file()


def test_no_spawn_without_a_rendezvous_is_refused(tiny_translation_data: Path, tmp_path: Path) -> None:
    result = run_cli(["fairseq-train", *train_args(tiny_translation_data, tmp_path / "ckpt"),
                      "--distributed-world-size", "2", "--distributed-no-spawn"], timeout=120)
    assert result.returncode != 0, cli_output(result)
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(ERROR + "--distributed-no-spawn with --distributed-world-size 2 on CPU"), cli_output(result)
    assert "torchrun" in last and "--distributed-init-method" in last, last
