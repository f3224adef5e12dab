"""A process that stops reading fairseq's BufferedIterator while its daemon thread is inside torch's C++
code (as fairseq-train does at --max-update mid-epoch) must exit with 0, not SIGABRT, once the plugin is
loaded (fairseq_accel/compat/background_consumer.py)."""
import subprocess
import sys

import pytest

from conftest import USER_DIR

#: Starts a BufferedIterator whose batches are slow matmuls (torch releases the GIL inside), takes one
#: and exits while the thread collates the next. argv[1] == "plugin" loads the plugin as --user-dir does.
STOP_MID_EPOCH = f"""
import argparse, sys
import torch
from fairseq import utils
from fairseq.data import iterators
if sys.argv[1] == "plugin":
    utils.import_user_module(argparse.Namespace(user_dir={str(USER_DIR)!r}))

class SlowBatches:
    def __len__(self):
        return 100

    def __iter__(self):
        matrix = torch.randn(1500, 1500)
        for _ in range(100):
            yield (matrix @ matrix).sum()

batches = iterators.BufferedIterator(2, SlowBatches())
next(batches)
"""


def stop_mid_epoch(mode: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", STOP_MID_EPOCH, mode], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("attempt", range(3))
def test_exit_while_the_loader_thread_collates_returns_0(attempt: int) -> None:
    result = stop_mid_epoch("plugin")
    assert result.returncode == 0, result.stderr[-2000:]


def test_stock_fairseq_aborts_there_so_the_check_can_fail() -> None:
    result = stop_mid_epoch("stock")
    assert result.returncode != 0 and "terminate called" in result.stderr, (result.returncode, result.stderr[-500:])
