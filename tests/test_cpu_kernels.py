"""The C++ CPU kernel of the fast generator (fairseq_accel/csrc, fairseq_accel/inference/cpu_kernels.py):
log-softmax + fairseq's token rules + top-k against the numpy reference of the CUDA kernel (the same
contract), and the generator's choice of it. Built by pip install; under CI=true its absence fails."""
import logging

import numpy as np
import pytest
import torch

import kernel_reference as ref
from test_cuda_kernels import check_topk
from fairseq_accel.inference import cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.cpu_kernels_available(),
                                reason="the C++ CPU kernels are not built (pip install -e . with g++)")


class CpuBackend:
    @staticmethod
    def topk(logits: np.ndarray, bias: np.ndarray, k: int, rules: dict, index_dtype: torch.dtype):
        values, indices, lse = cpu_kernels.log_softmax_topk(torch.from_numpy(logits), torch.from_numpy(bias), k,
                                                            **rules)
        return values.numpy(), indices.numpy(), lse.numpy()


@pytest.mark.parametrize("eos_mode", [ref.EOS_NORMAL, ref.EOS_FORBIDDEN, ref.EOS_ONLY])
@pytest.mark.parametrize("rows,vocab,k,ties", [(7, 8000, 10, False), (5, 50, 10, True), (3, 12, 12, True),
                                               (160, 1000, 64, False)])
def test_log_softmax_topk_matches_the_reference(rows: int, vocab: int, k: int, ties: bool, eos_mode: int) -> None:
    with torch.inference_mode():
        check_topk(CpuBackend, rows, vocab, k, eos_mode, ties)


def test_threads_give_the_same_result() -> None:
    logits, bias = torch.randn(64, 3000), torch.randn(64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_kernels.log_softmax_topk(logits, bias, 10, 1, 3, 2)
        torch.set_num_threads(2)
        two = cpu_kernels.log_softmax_topk(logits, bias, 10, 1, 3, 2)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


def test_bad_arguments_are_one_line() -> None:
    with pytest.raises(RuntimeError, match="logits must be a float32 CPU tensor"):
        cpu_kernels.log_softmax_topk(torch.zeros(3, 10, dtype=torch.float64), torch.zeros(3), 2, 1, 3, 2)
    with pytest.raises(RuntimeError, match="k must be in"):
        cpu_kernels.log_softmax_topk(torch.zeros(3, 10), torch.zeros(3), 11, 1, 3, 2)


def test_generator_takes_the_kernel_on_cpu_and_says_once_when_it_is_missing(monkeypatch, caplog) -> None:
    cpu = torch.device("cpu")
    assert cpu_kernels.resolve_cpu_kernels("auto", cpu) is cpu_kernels
    assert cpu_kernels.resolve_cpu_kernels("torch", cpu) is None
    monkeypatch.setattr(cpu_kernels, "_cpu_kernels", None)
    monkeypatch.setattr(cpu_kernels, "_noticed", False)
    with caplog.at_level(logging.WARNING):
        assert cpu_kernels.resolve_cpu_kernels("auto", cpu) is None
        assert cpu_kernels.resolve_cpu_kernels("auto", cpu) is None
    notices = [record.message for record in caplog.records if "C++ CPU kernels are not built" in record.message]
    assert len(notices) == 1 and "pip install -e ." in notices[0]
