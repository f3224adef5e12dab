"""The C++ CPU kernels of the fast generator (fairseq_accel/csrc, fairseq_accel/inference/cpu_kernels.py):
log-softmax + fairseq's token rules + top-k against the numpy reference of the CUDA kernel (the same
contract), the attention over the self-attention cache and over the encoder memory and the causal convolution
window against the torch paths of beam_cache, the candidate merge and beam advance against the generator's torch
path, and the generator's choice of them. Built by pip install; under
CI=true their absence fails."""
import logging
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import numpy as np
import pytest
import torch

import kernel_reference as ref
from test_cuda_kernels import check_topk
from fairseq_accel.inference import cpu_kernels
from fairseq_accel.inference.beam_cache import AttentionKVCache, BeamIndirection, CrossAttentionMemory, WindowCache
from fairseq_accel.inference.fast_generator import _BeamSearch

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


LOG_PROBABILITY_CHECK = """
import torch
from fairseq_accel.inference import cpu_kernels
generator = torch.Generator().manual_seed(0)
for vocab in (8000, 1003, 37, 17, 16, 12):  # whole vectors of 16, tails, and fewer than 16
    for scale in (1.0, 30.0):
        logits, bias = torch.randn(9, vocab, generator=generator) * scale, torch.randn(9, generator=generator)
        logits[2, 5] = logits[2].max()  # a tie at the top
        logits[4, 7] = float("nan")
        k = min(10, vocab - 1)
        values, ids, shift = cpu_kernels.log_softmax_topk(logits, bias, k, 1, 3, 2, 0.5, 0)
        log_probs = torch.log_softmax(logits, -1)
        rules = log_probs.clone()
        rules[:, 1] = -float("inf")
        rules[:, 3] -= 0.5
        rules[4] = -float("inf")  # a NaN row offers nothing: -inf, the lowest ids
        expected, expected_ids = (t[:, :k] for t in torch.sort(rules + bias[:, None], descending=True, stable=True))
        assert torch.equal(values, expected), (vocab, scale)
        keep = torch.arange(9) != 4  # row 4 (the NaN) by its values only
        assert torch.equal(ids[keep], expected_ids[keep]), (vocab, scale)
        assert torch.equal(shift[keep], (logits[:, 0] - log_probs[:, 0])[keep]), (vocab, scale)
print(torch.backends.cpu.get_cpu_capability())
"""


@pytest.mark.parametrize("capability", [None, "avx2"])
def test_log_softmax_topk_gives_atens_log_probabilities_bit_for_bit(capability: Optional[str]) -> None:
    """The values are torch.log_softmax's exactly (what the Python search and stock compare against): where ATen
    runs its AVX-512 kernel the kernel computes them itself in ATen's order, and where ATen runs another one
    (ATEN_CPU_CAPABILITY=avx2 here) it calls ATen's."""
    env = {**os.environ, **({"ATEN_CPU_CAPABILITY": capability} if capability else {})}
    result = subprocess.run([sys.executable, "-c", LOG_PROBABILITY_CHECK], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert capability is None or result.stdout.split()[-1] == capability.upper()


def test_threads_give_the_same_result() -> None:
    """The kernels split their loops between torch's threads (the extension is built with OpenMP) where there is
    enough work (kMinParallelWork): the top-k by rows, the int8 GEMM by columns, the attention by (row, head); every
    split gives the one-thread values."""
    generator = torch.Generator().manual_seed(0)
    logits, bias = torch.randn(64, 3000, generator=generator), torch.randn(64, generator=generator)
    levels = torch.randint(-127, 128, (1000, 160), dtype=torch.int8, generator=generator)
    int8 = cpu_kernels.int8_weights(levels, torch.rand(1000, generator=generator) * 0.01,
                                    torch.randn(1000, generator=generator), 0.05, 64)
    rows = torch.randn(5, 160, generator=generator)
    q, keys, values = (torch.randn(*shape, generator=generator)
                       for shape in ((12, 4, 36), (3, 4, 200, 36), (3, 4, 200, 36)))
    padding = torch.zeros(3, 200, dtype=torch.bool)
    padding[1, :4] = True
    runs = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            runs.append([*cpu_kernels.log_softmax_topk(logits, bias, 10, 1, 3, 2), int8(rows),
                         cpu_kernels.memory_attention(q, keys, values, padding, 4)])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_kernels_write_into_the_buffers_they_are_given() -> None:
    """The decoder step's reused buffers (StepBuffers): the attention kernels and the int8 GEMM write their output
    into ``out`` and give the values they give into a fresh tensor; an ``out`` of another shape is one line."""
    generator = torch.Generator().manual_seed(0)
    q, keys, values = (torch.randn(*shape, generator=generator) for shape in ((8, 2, 16), (2, 2, 5, 16), (2, 2, 5, 16)))
    padding = torch.zeros(2, 5, dtype=torch.bool)
    out = torch.full((8, 2, 16), math.nan)
    given = cpu_kernels.native_kernels().memory_attention(q, keys, values, padding, 4, out)
    assert given.data_ptr() == out.data_ptr()
    assert torch.equal(out, cpu_kernels.memory_attention(q, keys, values, padding, 4))
    levels = torch.randint(-127, 128, (24, 16), dtype=torch.int8, generator=generator)
    int8 = cpu_kernels.int8_weights(levels, torch.rand(24, generator=generator), None, 0.05, 64)
    rows, out = torch.randn(3, 16, generator=generator), torch.full((3, 24), math.nan)
    assert int8.run(rows, "", False, out).data_ptr() == out.data_ptr() and torch.equal(out, int8(rows))
    wrong_shape = r"memory_attention: out must be a contiguous float32 CPU tensor of \[8, 2, 16\]"
    with pytest.raises(RuntimeError, match=wrong_shape):
        cpu_kernels.native_kernels().memory_attention(q, keys, values, padding, 4, torch.empty(8, 2, 15))
    with pytest.raises(RuntimeError, match=r"int8 linear: out must be a contiguous float32 CPU tensor of \[3, 24\]"):
        int8.run(rows, "", False, torch.empty(24, 3).t())


def test_the_extension_is_built_with_openmp() -> None:
    """Without OpenMP at::parallel_for runs every kernel's loop on one thread, whatever torch's thread count."""
    library = Path(cpu_kernels.native_kernels().__file__).read_bytes()
    assert b"GOMP_parallel" in library


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


def caches(dtype: str = "fp32", beam: int = 4, batch: int = 3, heads: int = 4, dim: int = 36, steps: int = 9):
    """The same self-attention cache twice over one indirection: torch path and C++ kernel."""
    indirection = BeamIndirection(batch, beam, steps, torch.device("cpu"))
    make = lambda kernels: AttentionKVCache(indirection, heads, dim, dtype, torch.float32,  # noqa: E731
                                            torch.device("cpu"), cpu_kernels=kernels)
    return indirection, make(None), make(cpu_kernels)


@pytest.mark.parametrize("dtype", ["fp32", "int8"])
def test_cache_attention_step_equals_the_torch_cache_through_reorders_and_finished_sentences(dtype: str) -> None:
    """head size 36: the 16-wide dot product and its tail; 20 steps: the scores' maximum by lanes from 16 keys on;
    beams reordered every step, a sentence leaves. The int8 cache: the same levels and scales as the torch path's
    quantization, read without a float32 copy."""
    torch.manual_seed(0)
    indirection, reference, kernel = caches(dtype, steps=21)
    assert kernel.cpu_kernels is cpu_kernels and reference.cpu_kernels is None
    for step in range(20):
        rows = indirection.batch * indirection.beam
        # odd steps: the views a fused query/key/value projection unbinds into (read in place, rows 3 H D apart)
        q, k, v = torch.randn(rows, 3, 4, 36).unbind(1) if step % 2 else (torch.randn(rows, 4, 36) for _ in range(3))
        expected, got = reference.step(q, k, v), kernel.step(q, k, v)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        for name in ("keys", "values", "key_scale", "value_scale"):
            if getattr(reference, name) is not None:
                used = slice(0, step + 1)
                assert torch.equal(getattr(kernel, name)[:, :, used], getattr(reference, name)[:, :, used]), name
        if step == 3:  # sentence 1 finished
            keep = torch.tensor([0, 2])
            indirection.keep(keep)
            reference.keep(keep)
            kernel.keep(keep)
        indirection.advance(torch.randint(0, indirection.beam, (indirection.batch, indirection.beam)))


def test_memory_attention_equals_the_torch_memory_and_leaves_padding_out() -> None:
    torch.manual_seed(1)
    beam, batch, heads, source, dim = 5, 3, 2, 7, 16
    keys, values = torch.randn(batch, heads, source, dim), torch.randn(batch, heads, source, dim)
    padding = torch.zeros(batch, source, dtype=torch.bool)
    padding[1, 4:] = True
    for mask in (padding, None):
        reference = CrossAttentionMemory(keys, values, mask, beam, "fp32")
        kernel = CrossAttentionMemory(keys, values, mask, beam, "fp32", cpu_kernels=cpu_kernels)
        q = torch.randn(batch * beam, heads, dim)
        torch.testing.assert_close(kernel.attend(q), reference.attend(q), rtol=1e-5, atol=1e-5)
        keep = torch.tensor([1, 2])
        reference.keep(keep)
        kernel.keep(keep)
        q = q[beam:]
        torch.testing.assert_close(kernel.attend(q), reference.attend(q), rtol=1e-5, atol=1e-5)
    values[1, :, 4:] = 1e6  # padded positions: any value, none reaches the output
    kernel = CrossAttentionMemory(keys, values, padding, beam, "fp32", cpu_kernels=cpu_kernels)
    assert kernel.attend(torch.randn(batch * beam, heads, dim)).abs().max() < 1e3


def test_half_caches_keep_the_torch_path() -> None:
    indirection = BeamIndirection(2, 3, 4, torch.device("cpu"))
    half = AttentionKVCache(indirection, 2, 8, "fp16", torch.float32, torch.device("cpu"), cpu_kernels=cpu_kernels)
    assert half.cpu_kernels is None


@pytest.mark.parametrize("dynamic", [False, True])
def test_window_convolution_equals_the_torch_window_through_reorders_and_finished_sentences(dynamic: bool) -> None:
    """LSRA's lightweight convolution / SAN-M's FSMN step (fixed taps [W, C]) and LSRA's dynamic convolution (each
    hypothesis' taps [H, W]): width 4 reaches into the zero history at first."""
    torch.manual_seed(2)
    batch, beam, channels, width, heads = 3, 4, 12, 4, 3
    indirection = BeamIndirection(batch, beam, 8, torch.device("cpu"))
    reference, kernel = (WindowCache(indirection, width, channels, torch.float32, torch.device("cpu"), kernels)
                         for kernels in (None, cpu_kernels))
    for step in range(7):
        x = torch.randn(indirection.batch * beam, channels)
        weight = torch.randn(x.size(0), heads, width) if dynamic else torch.randn(width, channels)
        torch.testing.assert_close(kernel.convolve(x, weight), reference.convolve(x, weight), rtol=1e-5, atol=1e-5)
        if step == 2:
            keep = torch.tensor([0, 2])
            for holder in (indirection, reference, kernel):
                holder.keep(keep)
        indirection.advance(torch.randint(0, beam, (indirection.batch, beam)))


def row_candidates(rows: int, k: int, eos: int, generator: torch.Generator):
    """What log_softmax_topk returns: per row k distinct values, descending (one -inf: torch.topk orders equal
    values arbitrarily), token ids (some eos)."""
    values = torch.randn(rows, k, generator=generator).sort(dim=1, descending=True).values
    values[0, -1] = -math.inf
    ids = torch.randint(4, 50, (rows, k), generator=generator)
    ids[torch.rand(rows, k, generator=generator) < 0.2] = eos
    return values, ids


@pytest.mark.parametrize("rows_per_sentence", [1, 5])
def test_merge_candidates_equals_the_torch_candidates(rows_per_sentence: int) -> None:
    """The C++ merge against the torch path's topk over a sentence's rows and its eos mask (first step: one row)."""
    generator = torch.Generator().manual_seed(3)
    batch, beam, eos = 4, 5, 2
    k = 2 * beam
    values, ids = row_candidates(batch * rows_per_sentence, k, eos, generator)
    ignore = torch.rand(batch, beam, generator=generator) < 0.3
    scores, tokens, beams, eos_mask, ending = cpu_kernels.merge_candidates(values, ids, ignore, eos)
    top, index = values.view(batch, -1).topk(k)
    expected_mask = ids.view(batch, -1).gather(1, index).eq(eos) & top.ne(-math.inf)
    expected_mask[:, :beam] &= ~ignore
    assert torch.equal(scores, top) and torch.equal(beams, index // k)
    assert torch.equal(tokens, ids.view(batch, -1).gather(1, index)) and torch.equal(eos_mask, expected_mask)
    assert ending == bool(expected_mask[:, :beam].any())


def test_advance_beams_equals_the_torch_advance() -> None:
    """fairseq's advance (continuing candidates first, ending ones fill up; ignored beams count as ending), the
    token and score histories reordered in place, over several steps."""
    generator = torch.Generator().manual_seed(4)
    batch, beam, length, eos = 3, 4, 9, 2
    k = 2 * beam
    parents_seen = []
    searches = []
    for native in (True, False):
        search = object.__new__(_BeamSearch)
        search.bsz, search.beam, search.native_search, search.device = batch, beam, native, torch.device("cpu")
        search.cand_offsets = torch.arange(k)
        search.cands_to_ignore = torch.zeros(batch, beam, dtype=torch.bool)
        search.tokens = torch.arange(batch * beam * (length + 2)).view(batch * beam, -1)
        search.scores = torch.randn(batch * beam, length + 1, generator=torch.Generator().manual_seed(5))
        search.decoder = SimpleNamespace(advance=parents_seen.append)
        searches.append(search)
    for step in range(6):
        scores = torch.randn(batch, k, generator=generator).sort(dim=1, descending=True).values
        tokens = torch.randint(3, 40, (batch, k), generator=generator)
        beams = torch.randint(beam, (batch, k), generator=generator)
        eos_mask = torch.rand(batch, k, generator=generator) < (0.9 if step == 3 else 0.25)  # step 3: few continue
        for search in searches:
            search._advance(step, scores, tokens, beams, eos_mask.clone())
        native, reference = searches
        assert torch.equal(parents_seen[-2], parents_seen[-1])
        assert torch.equal(native.cands_to_ignore, reference.cands_to_ignore)
        assert torch.equal(native.tokens, reference.tokens) and torch.equal(native.scores, reference.scores)
        assert step != 3 or native.cands_to_ignore.any()  # ending candidates filled some beams


@pytest.mark.parametrize("dtype", [torch.float32, torch.int8, torch.bool])
def test_compact_sentences_equals_index_select_of_the_written_steps(dtype: torch.dtype) -> None:
    buffer = (torch.randn(5, 3, 7, 2, 4) * 50).to(dtype)
    sentences = torch.tensor([1, 3, 4])
    expected = buffer.index_select(0, sentences)
    front = cpu_kernels.compact_sentences(buffer, sentences, 2, 4)  # the first 4 of 7 steps were written
    assert front.data_ptr() == buffer.data_ptr() and torch.equal(front[:, :, :4], expected[:, :, :4])
    before = buffer.clone()
    whole = cpu_kernels.compact_sentences(buffer, torch.tensor([0, 2]), 2, 7)  # whole rows
    assert torch.equal(whole, before.index_select(0, torch.tensor([0, 2])))
    with pytest.raises(RuntimeError, match="increasing row indices"):
        cpu_kernels.compact_sentences(buffer, torch.tensor([2, 1]), 2, 4)


def test_table_advance_is_the_torch_gather() -> None:
    """BeamIndirection.advance with the C++ kernels (one in-place call) and with torch (gather) give the same table
    over steps and a finished sentence; a parent outside the beam is a one-line error that leaves the table as is."""
    generator = torch.Generator().manual_seed(3)
    torch_path, native = (BeamIndirection(3, 4, 9, torch.device("cpu"), kernels) for kernels in (None, cpu_kernels))
    for step in range(8):
        parents = torch.randint(0, 4, (torch_path.batch, 4), generator=generator)
        for indirection in (torch_path, native):
            indirection.advance(parents)
        assert torch.equal(native.table, torch_path.table) and native.step == torch_path.step
        if step == 3:
            for indirection in (torch_path, native):
                indirection.keep(torch.tensor([0, 2]))
    assert native.table[:, :, :8].ne(torch.arange(4).view(1, 4, 1)).any()  # the histories were reordered
    before = native.table.clone()
    with pytest.raises(RuntimeError, match="parent 4 outside the beam of 4"):
        cpu_kernels.advance_table(native.table, torch.tensor([[1, 0, 3, 2], [1, 4, 0, 0]]), 8)
    assert torch.equal(native.table, before)  # checked before anything was moved
