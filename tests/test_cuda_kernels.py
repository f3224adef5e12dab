"""CUDA kernels of the fast beam-search generator (fairseq_accel/kernels/, inference/cuda_kernels.py).

The numpy references of kernel_reference.py are checked once against plain Python loops; everything else
is product code checked against them. Without a GPU: every kernel file compiles with NVRTC, the index
arithmetic and per-element rules of beam_search_common.cuh (built for the CPU with g++) agree with numpy,
the wrappers reject bad arguments, the kernels, run through the wrappers on a CPU emulation of CUDA
threads, agree with the references, and so does the decoder's int8 cache (inference/beam_cache.py) on its
torch path and on the emulated kernels. On a GPU (marker ``gpu``): each kernel against the references.
Under CI=true a missing g++, CuPy or NVRTC fails these tests (tests/conftest.py); only ``gpu`` tests skip.

This file imports neither fairseq nor the fairseq_accel package and uses no conftest fixture, so that
it runs on a GPU machine without fairseq:
    python -m pytest -p no:cacheprovider --noconftest -m gpu tests/test_cuda_kernels.py
"""
from __future__ import annotations

import ctypes
import importlib.util
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import kernel_reference as ref
from cuda_emulation import build_emulated_library, patch_kernels_module

REPO_ROOT = Path(__file__).resolve().parent.parent
KERNELS_DIR = REPO_ROOT / "fairseq_accel" / "kernels"
HEADER = KERNELS_DIR / "beam_search_common.cuh"


def load_inference_module(name: str):
    """fairseq_accel/inference/<name>.py loaded by file path (no package import, so no fairseq)."""
    path = REPO_ROOT / "fairseq_accel" / "inference" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"fairseq_accel_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


ck = load_inference_module("cuda_kernels")
beam_cache = load_inference_module("beam_cache")  # the torch (CPU) path of the same cache and attention
HAVE_CUPY = importlib.util.find_spec("cupy") is not None
needs_cupy = pytest.mark.skipif(not HAVE_CUPY, reason="cupy is not installed (pip install 'fairseq_accel[gpu]')")


# ---- sources compile ----------------------------------------------------------------------------------

def test_kernel_folder_has_the_kernels():
    assert "beam_search_kernels.cu" in [path.name for path in ck.kernel_files()]
    source = ck.kernel_source(KERNELS_DIR / "beam_search_kernels.cu")
    assert "#include" not in re.sub(r"#include <[^>]+>", "", source), "local headers are inlined"
    assert "namespace fa {" in source


@needs_cupy
def test_every_kernel_file_compiles_with_nvrtc():
    ptx = ck.compile_to_ptx("compute_80")
    assert set(ptx) == {path.name for path in ck.kernel_files()}
    entries = set(re.findall(r"\.entry\s+(\w+)", ptx["beam_search_kernels.cu"]))
    assert entries == {"fa_quantize_write_f32", "fa_quantize_write_f16", "fa_int8_cache_attention",
                       "fa_log_softmax_topk_i64", "fa_log_softmax_topk_i32"}
    assert ".local" not in ptx["beam_search_kernels.cu"], "no kernel spills arrays to local memory"


@needs_cupy
def test_compile_errors_carry_the_nvrtc_log(tmp_path, monkeypatch):
    (tmp_path / "broken.cu").write_text('extern "C" __global__ void broken(float* x) { x[0] = undefined_name; }\n')
    monkeypatch.setattr(ck, "KERNELS_DIR", tmp_path)
    with pytest.raises(ck.KernelCompileError, match="undefined_name"):
        ck.compile_to_ptx()


def defines(path: Path) -> dict:
    return {name: int(value) for name, value in re.findall(r"^#define (FA_\w+) (\d+)\b", path.read_text(), re.MULTILINE)}


def test_python_limits_match_the_kernels():
    values = {**defines(HEADER), **defines(KERNELS_DIR / "beam_search_kernels.cu")}
    assert (values["FA_MAX_HEAD_DIM"], values["FA_MAX_STEPS"], values["FA_MAX_TOPK"]) == (
        ck.MAX_HEAD_DIM, ck.MAX_STEPS, ck.MAX_TOPK)
    assert (values["FA_QUANT_WARPS"], values["FA_ATTN_THREADS"], values["FA_TOPK_THREADS"]) == (
        ck.QUANT_WARPS, ck.ATTN_THREADS, ck.TOPK_THREADS)
    assert "EOS_NORMAL = 0, EOS_FORBIDDEN = 1, EOS_ONLY = 2" in HEADER.read_text()
    assert (ck.EOS_NORMAL, ck.EOS_FORBIDDEN, ck.EOS_ONLY) == (ref.EOS_NORMAL, ref.EOS_FORBIDDEN, ref.EOS_ONLY) == (0, 1, 2)


# ---- the header's index logic and rules, built for the CPU --------------------------------------------

HOST_WRAPPER = r"""
#include "beam_search_common.cuh"

extern "C" {
void step_offsets(int n, const int* idx, int num_heads, int head_dim, long long* out) {
    for (int j = 0; j < n; ++j) out[j] = fa::step_offset(idx[3 * j], idx[3 * j + 1], idx[3 * j + 2], num_heads, head_dim);
}
void kv_cache_offsets(int n, const int* idx, int num_heads, int max_steps, int beam, int head_dim, long long* out) {
    for (int j = 0; j < n; ++j) {
        const int* e = idx + 5 * j;
        out[j] = fa::kv_cache_offset(e[0], e[1], e[2], e[3], e[4], num_heads, max_steps, beam, head_dim);
    }
}
void kv_scale_offsets(int n, const int* idx, int num_heads, int max_steps, int beam, long long* out) {
    for (int j = 0; j < n; ++j) {
        const int* e = idx + 4 * j;
        out[j] = fa::kv_scale_offset(e[0], e[1], e[2], e[3], num_heads, max_steps, beam);
    }
}
void indir_offsets(int n, const int* idx, int beam, int max_steps, long long* out) {
    for (int j = 0; j < n; ++j) out[j] = fa::indir_offset(idx[3 * j], idx[3 * j + 1], idx[3 * j + 2], beam, max_steps);
}
void row_split(int n, const int* rows, int beam, int* batch, int* slot) {
    for (int j = 0; j < n; ++j) {
        batch[j] = fa::row_batch(rows[j], beam);
        slot[j] = fa::row_beam(rows[j], beam);
    }
}
void quantize_rows(int n, int head_dim, const float* x, signed char* levels, float* scales) {
    for (int r = 0; r < n; ++r) {
        float absmax = 0.f;
        for (int d = 0; d < head_dim; ++d) absmax = fmaxf(absmax, fabsf(x[r * head_dim + d]));
        const float inv_scale = fa::quant_inv_scale(absmax);
        for (int d = 0; d < head_dim; ++d) levels[r * head_dim + d] = (signed char)fa::quant_level(x[r * head_dim + d], inv_scale);
        scales[r] = fa::quant_scale(absmax);
    }
}
void token_scores(int rows, int vocab, const float* logits, const float* lse, const float* bias, int pad_idx,
                  int unk_idx, int eos_idx, float unk_penalty, int eos_mode, float* out) {
    for (int r = 0; r < rows; ++r)
        for (int v = 0; v < vocab; ++v)
            out[r * vocab + v] = fa::beam_token_score(logits[r * vocab + v], lse[r], bias[r], v, pad_idx, unk_idx,
                                                      eos_idx, unk_penalty, eos_mode);
}
/* as the kernel does: `lanes` strided accumulators, then a butterfly of merges, then a sequential merge */
float lse_strided(int n, const float* x, int lanes) {
    fa::LseAcc acc[1024];
    for (int l = 0; l < lanes; ++l) acc[l] = fa::lse_empty();
    for (int j = 0; j < n; ++j) acc[j % lanes] = fa::lse_push(acc[j % lanes], x[j]);
    for (int width = lanes / 2; width > 0; width /= 2)
        for (int l = 0; l < width; ++l) acc[l] = fa::lse_merge(acc[l], acc[l + width]);
    return fa::lse_value(fa::lse_merge(fa::lse_empty(), acc[0]));
}
void order_keys(int n, const float* x, unsigned* keys) {
    for (int j = 0; j < n; ++j) keys[j] = fa::float_order_key(x[j]);
}
/* the kernel's radix selection with a plain histogram loop in place of the shared-memory atomics */
void radix_select(int n, const float* x, int k, unsigned* kth_key, int* n_tied) {
    fa::RadixState state = fa::radix_start(k);
    for (int shift = 24; shift >= 0; shift -= 8) {
        unsigned hist[256] = {0};
        for (int j = 0; j < n; ++j) {
            const unsigned key = fa::float_order_key(x[j]);
            if (fa::radix_is_candidate(state, key)) ++hist[fa::radix_digit(key, shift)];
        }
        state = fa::radix_step(state, hist, shift);
    }
    *kth_key = state.prefix;
    *n_tied = state.remaining;
}
}
"""


@pytest.fixture(scope="module")
def host_lib(tmp_path_factory):
    """beam_search_common.cuh compiled for the CPU into a shared library, with array wrappers."""
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("g++ is not installed: the host build of the kernel header cannot be tested")
    folder = tmp_path_factory.mktemp("host_header")
    source, library = folder / "host_wrapper.cpp", folder / "libfa_host.so"
    source.write_text(HOST_WRAPPER)
    command = [compiler, "-std=c++17", "-O2", "-ffp-contract=off", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC",
               f"-I{KERNELS_DIR}", str(source), "-o", str(library)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lib = ctypes.CDLL(str(library))
    lib.lse_strided.restype = ctypes.c_float
    return lib


def ptr(array: np.ndarray):
    assert array.flags.c_contiguous
    return array.ctypes.data_as(ctypes.c_void_p)


def random_indices(rng, shape, count):
    return np.ascontiguousarray(np.stack([rng.integers(0, size, count) for size in shape], axis=1).astype(np.int32))


SHAPES = [(1, 1, 1, 1, 1), (2, 4, 7, 5, 36), (3, 8, 1024, 4, 64), (16, 2, 100, 12, 128), (1, 16, 3, 1, 80)]


@pytest.mark.parametrize("shape", SHAPES)
def test_header_offsets_match_numpy_layouts(host_lib, shape):
    rng = np.random.default_rng(sum(shape))
    batch, num_heads, max_steps, beam, head_dim = shape
    count = 300

    idx = random_indices(rng, shape, count)
    out = np.empty(count, np.int64)
    host_lib.kv_cache_offsets(count, ptr(idx), num_heads, max_steps, beam, head_dim, ptr(out))
    np.testing.assert_array_equal(out, np.ravel_multi_index(idx.T, shape))

    idx = random_indices(rng, shape[:4], count)
    host_lib.kv_scale_offsets(count, ptr(idx), num_heads, max_steps, beam, ptr(out))
    np.testing.assert_array_equal(out, np.ravel_multi_index(idx.T, shape[:4]))

    idx = random_indices(rng, (batch, beam, max_steps), count)
    host_lib.indir_offsets(count, ptr(idx), beam, max_steps, ptr(out))
    np.testing.assert_array_equal(out, np.ravel_multi_index(idx.T, (batch, beam, max_steps)))

    idx = random_indices(rng, (batch * beam, num_heads, head_dim), count)
    host_lib.step_offsets(count, ptr(idx), num_heads, head_dim, ptr(out))
    np.testing.assert_array_equal(out, np.ravel_multi_index(idx.T, (batch * beam, num_heads, head_dim)))

    rows = np.ascontiguousarray(rng.integers(0, batch * beam, count).astype(np.int32))
    b, i = np.empty(count, np.int32), np.empty(count, np.int32)
    host_lib.row_split(count, ptr(rows), beam, ptr(b), ptr(i))
    np.testing.assert_array_equal(np.stack([b, i]), np.stack(np.unravel_index(rows, (batch, beam))))


def test_header_offsets_do_not_overflow_32_bits(host_lib):
    shape = (128, 16, 1024, 12, 128)  # 3.2e9 elements: the last offsets pass 2**31
    idx = np.array([[127, 15, 1023, 11, 127]], np.int32)
    out = np.empty(1, np.int64)
    host_lib.kv_cache_offsets(1, ptr(idx), *shape[1:], ptr(out))
    assert out[0] == np.prod(shape) - 1 > 2**31


def test_header_quantization_matches_the_reference_exactly(host_lib):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((64, 36)) * rng.uniform(1e-3, 10, (64, 1))).astype(np.float32)
    x[3] = 0.0
    x[5] = [127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5] + [0.0] * 29  # inv_scale 1: halves round to even
    levels, scales = np.empty(x.shape, np.int8), np.empty(len(x), np.float32)
    host_lib.quantize_rows(len(x), x.shape[1], ptr(x), ptr(levels), ptr(scales))
    expected_levels, expected_scales = ref.quantize(x)
    np.testing.assert_array_equal(levels, expected_levels)
    np.testing.assert_array_equal(scales, expected_scales)
    assert list(levels[5, :7]) == [127, 0, 2, 2, 0, -2, -2]


@pytest.mark.parametrize("eos_mode", [ref.EOS_NORMAL, ref.EOS_FORBIDDEN, ref.EOS_ONLY])
def test_header_token_scores_match_the_reference_exactly(host_lib, eos_mode):
    rng = np.random.default_rng(eos_mode)
    logits = (rng.standard_normal((6, 50)) * 4).astype(np.float32)
    logits[2, 7] = np.nan
    logits[4, :] = np.nan
    lse = ref.logsumexp(logits)
    bias = np.array([0.0, -3.5, -1e-3, -40.0, 2.0, np.nan], np.float32)
    out = np.empty_like(logits)
    host_lib.token_scores(6, 50, ptr(logits), ptr(lse), ptr(bias), 1, 3, 2, ctypes.c_float(0.75), eos_mode, ptr(out))
    expected = ref.token_scores(logits, lse, bias, pad_idx=1, unk_idx=3, eos_idx=2, unk_penalty=0.75, eos_mode=eos_mode)
    np.testing.assert_array_equal(out, expected)
    assert not np.isnan(out).any() and np.isneginf(out[:, 1]).all() and np.isneginf(out[4]).all()


@pytest.mark.parametrize("lanes", [1, 32, 256])
def test_header_running_logsumexp(host_lib, lanes):
    rng = np.random.default_rng(lanes)
    for x in [rng.standard_normal(1000) * 10, rng.standard_normal(7) - 1e4, np.array([3.0]), np.full(300, -np.inf),
              np.concatenate([[-np.inf] * 5, rng.standard_normal(50)])]:
        x = np.ascontiguousarray(x, np.float32)
        value = host_lib.lse_strided(len(x), ptr(x), lanes)
        finite = x[np.isfinite(x)].astype(np.float64)
        expected = np.logaddexp.reduce(finite) if finite.size else -np.inf
        np.testing.assert_allclose(value, expected, rtol=1e-6, atol=1e-5)
    x = np.ascontiguousarray(np.concatenate([rng.standard_normal(40), [np.nan]]), np.float32)
    assert np.isnan(host_lib.lse_strided(len(x), ptr(x), lanes)), "a NaN logit makes the row's lse NaN"


def test_header_order_keys_sort_like_floats(host_lib):
    rng = np.random.default_rng(1)
    tiny = np.finfo(np.float32).smallest_subnormal
    x = np.concatenate([rng.standard_normal(500) * 100, [np.inf, -np.inf, 0.0, -0.0, tiny, -tiny, 1e38, -1e38]])
    x = np.ascontiguousarray(x, np.float32)
    keys = np.empty(len(x), np.uint32)
    host_lib.order_keys(len(x), ptr(x), ptr(keys))
    a, b = np.meshgrid(np.arange(len(x)), np.arange(len(x)))
    np.testing.assert_array_equal(keys[a] > keys[b], x[a] > x[b])
    np.testing.assert_array_equal(keys[a] == keys[b], x[a] == x[b])


def test_header_radix_selection_finds_the_kth_largest_and_its_ties(host_lib):
    rng = np.random.default_rng(2)
    cases = [rng.standard_normal(1000), rng.integers(-3, 3, 500).astype(float), np.full(100, -np.inf),
             np.concatenate([[-np.inf] * 60, [1.0, 2.0, 2.0]]), rng.standard_normal(64) * 1e-30]
    for x in cases:
        x = np.ascontiguousarray(x, np.float32)
        for k in sorted({1, 2, 5, 17, 64, len(x)} & set(range(1, min(64, len(x)) + 1))):
            kth_key, n_tied = ctypes.c_uint(), ctypes.c_int()
            host_lib.radix_select(len(x), ptr(x), k, ctypes.byref(kth_key), ctypes.byref(n_tied))
            kth = np.sort(x)[::-1][k - 1]
            keys = np.empty(1, np.uint32)
            host_lib.order_keys(1, ptr(np.array([kth], np.float32)), ptr(keys))
            assert kth_key.value == keys[0]
            assert n_tied.value == k - np.count_nonzero(x > kth) >= 1


# ---- kernel_reference.py against plain loops (once), so that the product code can be checked against it --

def naive_quantize(vector):
    """One vector, element by element in float32: level = rint(x * (127 / absmax)) clipped, scale = absmax / 127."""
    absmax = np.float32(0)
    for value in vector:
        absmax = max(absmax, abs(np.float32(value)))
    if absmax == 0:
        return [0] * len(vector), np.float32(0)
    inv_scale = np.float32(127) / absmax
    levels = [int(min(127, max(-127, np.rint(np.float32(value) * inv_scale)))) for value in vector]
    return levels, absmax / np.float32(127)


def test_reference_quantize_write_equals_plain_loops():
    rng = np.random.default_rng(3)
    batch, num_heads, max_steps, beam, head_dim, step = 2, 3, 4, 2, 5, 2
    x = (rng.standard_normal((batch * beam, num_heads, head_dim)) * rng.uniform(1e-3, 30, (1, num_heads, 1)))
    x = x.astype(np.float32)
    x[1, 2] = 0.0
    x[0, 0] = [127.0, 0.5, 1.5, -2.5, 3.0]  # absmax 127: the halves round to even
    cache = np.full((batch, num_heads, max_steps, beam, head_dim), 7, np.int8)
    scales = np.full(cache.shape[:4], 9.0, np.float32)
    ref.quantize_write(x, cache, scales, step)
    for row in range(batch * beam):
        b, i = divmod(row, beam)  # row b * beam + i is hypothesis i of sentence b
        for h in range(num_heads):
            levels, scale = naive_quantize(x[row, h])
            assert cache[b, h, step, i].tolist() == levels and scales[b, h, step, i] == scale
    assert cache[0, 0, step, 0].tolist() == [127, 0, 2, -2, 3]
    untouched = [t for t in range(max_steps) if t != step]
    assert (cache[:, :, untouched] == 7).all() and (scales[:, :, untouched] == 9.0).all()


def random_cache(rng, batch, num_heads, max_steps, beam, head_dim):
    def levels():
        return rng.integers(-127, 128, (batch, num_heads, max_steps, beam, head_dim)).astype(np.int8)

    def scales():
        return rng.uniform(1e-3, 2e-2, (batch, num_heads, max_steps, beam)).astype(np.float32)

    return levels(), levels(), scales(), scales()


def test_reference_int8_cache_attention_equals_plain_loops():
    rng = np.random.default_rng(5)
    batch, num_heads, max_steps, beam, head_dim, n_steps = 2, 2, 6, 3, 4, 5
    k_cache, v_cache, k_scale, v_scale = random_cache(rng, batch, num_heads, max_steps, beam, head_dim)
    q = rng.standard_normal((batch * beam, num_heads, head_dim)).astype(np.float32) * 20
    indir = rng.integers(0, beam, (batch, beam, max_steps)).astype(np.int32)
    out = ref.int8_cache_attention(q, k_cache, v_cache, k_scale, v_scale, indir, n_steps)
    for row in range(batch * beam):
        b, i = divmod(row, beam)
        for h in range(num_heads):
            scores = []
            for t in range(n_steps):
                slot = indir[b, i, t]  # the beam slot holding step t of this hypothesis' history
                key = [float(k_cache[b, h, t, slot, d]) * float(k_scale[b, h, t, slot]) for d in range(head_dim)]
                scores.append(sum(float(q[row, h, d]) * key[d] for d in range(head_dim)))
            weights = [math.exp(score - max(scores)) for score in scores]
            for d in range(head_dim):
                value = sum(weights[t] * float(v_cache[b, h, t, indir[b, i, t], d]) * float(v_scale[b, h, t, indir[b, i, t]])
                            for t in range(n_steps))
                assert math.isclose(out[row, h, d], value / sum(weights), rel_tol=1e-9, abs_tol=1e-12)


@pytest.mark.parametrize("eos_mode", [ref.EOS_NORMAL, ref.EOS_FORBIDDEN, ref.EOS_ONLY])
def test_reference_log_softmax_topk_equals_plain_loops(eos_mode):
    rng = np.random.default_rng(6 + eos_mode)
    vocab, k, pad, unk, eos, penalty = 12, 5, 1, 3, 2, 0.5
    logits = np.round(rng.standard_normal((4, vocab)) * 3).astype(np.float32)  # rounded: exact ties
    logits[3, 6] = np.nan  # a NaN logit: every score of its row is -inf
    bias = np.array([0.0, -2.0, -0.25, -1.0], np.float32)
    values, indices, lse = ref.log_softmax_topk(logits, bias, k, pad, unk, eos, unk_penalty=penalty, eos_mode=eos_mode)
    for row in range(3):
        total = math.log(sum(math.exp(float(x)) for x in logits[row]))
        assert math.isclose(lse[row], total, rel_tol=1e-6)
        scores = []
        for token in range(vocab):
            score = float(logits[row, token]) - total
            if token == pad or (eos_mode == ref.EOS_FORBIDDEN and token == eos):
                score = -math.inf
            if token == unk:
                score -= penalty
            if eos_mode == ref.EOS_ONLY and token != eos:
                score = -math.inf
            scores.append(score + float(bias[row]))
        ranked = sorted(range(vocab), key=lambda token: (-scores[token], token))[:k]  # ties: smaller id first
        assert indices[row].tolist() == ranked
        for value, token in zip(values[row], ranked):
            assert value == scores[token] or math.isclose(value, scores[token], rel_tol=1e-5, abs_tol=1e-5)
    assert np.isneginf(values[3]).all() and indices[3].tolist() == list(range(k))


# ---- argument checks (no GPU needed: shapes are checked before the device) ----------------------------

def cpu_cache(batch=2, num_heads=3, max_steps=5, beam=4, head_dim=8):
    return (torch.zeros(batch, num_heads, max_steps, beam, head_dim, dtype=torch.int8),
            torch.zeros(batch, num_heads, max_steps, beam))


def test_wrappers_reject_bad_arguments_with_clear_errors():
    cache, scales = cpu_cache()
    with pytest.raises(ValueError, match=r"x must have shape \[B\*beam, H, D\] = \(8, 3, 8\)"):
        ck.quantize_write(torch.zeros(4, 3, 8), cache, scales, 0)
    with pytest.raises(ValueError, match="x must be torch.float32 or torch.float16"):
        ck.quantize_write(torch.zeros(8, 3, 8, dtype=torch.float64), cache, scales, 0)
    with pytest.raises(ValueError, match="contiguous"):
        ck.quantize_write(torch.zeros(8, 8, 3).transpose(1, 2), cache, scales, 0)
    with pytest.raises(ValueError, match=r"step must be in \[0, 4\]"):
        ck.quantize_write(torch.zeros(8, 3, 8), cache, scales, 5)
    indir = torch.zeros(2, 4, 5, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"n_steps must be in \[1, 5\]"):
        ck.int8_cache_attention(torch.zeros(8, 3, 8), cache, cache, scales, scales, indir, 6)
    with pytest.raises(ValueError, match="indir must be torch.int32"):
        ck.int8_cache_attention(torch.zeros(8, 3, 8), cache, cache, scales, scales, indir.long(), 2)
    wide, wide_scales = cpu_cache(head_dim=130)
    with pytest.raises(ValueError, match=r"head dimension D must be in \[1, 128\]"):
        ck.int8_cache_attention(torch.zeros(8, 3, 130), wide, wide, wide_scales, wide_scales, indir, 2)
    with pytest.raises(ValueError, match=r"k must be in \[1, 10\]"):
        ck.log_softmax_topk(torch.zeros(3, 10), torch.zeros(3), 11, 1, 3, 2)
    with pytest.raises(ValueError, match=r"eos_idx must be in \[0, 99\]"):
        ck.log_softmax_topk(torch.zeros(3, 100), torch.zeros(3), 5, 1, 3, 100)
    with pytest.raises(ValueError, match="eos_mode must be 0"):
        ck.log_softmax_topk(torch.zeros(3, 100), torch.zeros(3), 5, 1, 3, 2, eos_mode=3)


def test_cpu_tensors_are_refused_with_the_reason():
    with pytest.raises(ck.CudaKernelsUnavailable, match="logits is on cpu; the kernels need CUDA tensors"):
        ck.log_softmax_topk(torch.zeros(3, 100), torch.zeros(3), 5, 1, 3, 2)
    assert not ck.cuda_kernels_available("cpu")
    if not torch.cuda.is_available():
        assert not ck.cuda_kernels_available()
        with pytest.raises(ck.CudaKernelsUnavailable, match="no CUDA device"):
            ck.require_cuda_kernels()


# ---- the kernels executed: on a GPU, and on the CPU under a thread-per-CUDA-thread emulation ----------
#
# Each check_* function runs one kernel through the torch wrappers of cuda_kernels.py (TorchBackend:
# numpy arrays in and out) and compares it with kernel_reference.py. On a GPU the wrappers launch the
# kernels with CuPy. Under the emulation (fixture `emulated`) they get CPU tensors, and their launches,
# with the grid, block and arguments they computed, go to the same .cu source built with g++ against a
# small CUDA emulation (cuda_emulation.py, cuda_emulation_src/): one std::thread per CUDA thread, real
# barriers for __syncthreads and for warp shuffles and ballots. That checks the kernels' logic and the wrappers' argument packing without a GPU,
# but says nothing about speed, occupancy or the GPU memory model.

def assert_levels_match(levels, expected, x, scales):
    """Equal, or one level apart where x * 127 / absmax lies within 1e-6 of a half (rounding of the
    product may then differ in its last bit)."""
    x = x.astype(np.float32)
    inv = np.zeros_like(scales)
    np.divide(ref.LEVELS, np.abs(x).max(-1), out=inv, where=scales > 0)
    product = x * inv[..., None]
    at_half = np.abs(np.abs(product - np.floor(product)) - 0.5) < 1e-6
    diff = np.abs(levels.astype(np.int32) - expected.astype(np.int32))
    assert diff.max() <= 1 and (at_half | (diff == 0)).all(), np.argwhere(diff > 0)[:5]


def check_quantize_write(backend, shape, dtype):
    rng = np.random.default_rng(sum(shape))
    batch, num_heads, max_steps, beam, head_dim = shape
    cache = rng.integers(-127, 128, shape).astype(np.int8)
    scales = rng.uniform(0, 1, shape[:4]).astype(np.float32)
    expected_cache, expected_scales = cache.copy(), scales.copy()
    steps = sorted({0, max_steps - 1, max_steps // 2})
    for step in steps:
        x = rng.standard_normal((batch * beam, num_heads, head_dim)) * rng.uniform(1e-3, 30, (1, num_heads, 1))
        x = x.astype(dtype)
        x[0, 0] = 0
        ref.quantize_write(x, expected_cache, expected_scales, step)
        backend.quantize_write(x, cache, scales, step)
        levels, step_scales = ref.quantize(x)
        np.testing.assert_array_equal(scales, expected_scales)
        written = cache[:, :, step].transpose(0, 2, 1, 3).reshape(levels.shape)
        assert_levels_match(written, levels, x, step_scales)
    untouched = np.ones(max_steps, bool)
    untouched[steps] = False
    np.testing.assert_array_equal(cache[:, :, untouched], expected_cache[:, :, untouched])


def check_attention(backend, shape, n_steps, misaligned=False):
    rng = np.random.default_rng(n_steps + sum(shape))
    batch, num_heads, max_steps, beam, head_dim = shape
    k_cache, v_cache, k_scale, v_scale = random_cache(rng, *shape)
    q = (rng.standard_normal((batch * beam, num_heads, head_dim)) * head_dim**-0.5).astype(np.float32)
    indir = rng.integers(0, beam, (batch, beam, max_steps)).astype(np.int32)
    expected = ref.int8_cache_attention(q, k_cache, v_cache, k_scale, v_scale, indir, n_steps)
    out = backend.attention(q, k_cache, v_cache, k_scale, v_scale, indir, n_steps, misaligned=misaligned)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    indir[-1, -1, n_steps - 1] = beam  # a slot out of range poisons that row, and only that row
    out = backend.attention(q, k_cache, v_cache, k_scale, v_scale, indir, n_steps)
    assert np.isnan(out[-1]).all()
    np.testing.assert_allclose(out[:-1], expected[:-1], rtol=1e-4, atol=1e-4)


def topk_case(rows, vocab, k, eos_mode, ties):
    rng = np.random.default_rng(vocab + k)
    logits = (rng.standard_normal((rows, vocab)) * 3).astype(np.float32)
    if ties:  # few distinct values: many exact ties at the k-th place
        logits = np.round(logits).astype(np.float32)
    if rows > 2:
        logits[1, vocab // 2] = np.nan  # a NaN logit turns the whole row to -inf
    bias = rng.uniform(-30, 0, rows).astype(np.float32)
    rules = dict(pad_idx=1, unk_idx=min(3, vocab - 1), eos_idx=min(2, vocab - 1), unk_penalty=0.25, eos_mode=eos_mode)
    return logits, bias, rules


def check_topk(backend, rows, vocab, k, eos_mode, ties, index_dtype=torch.int64):
    logits, bias, rules = topk_case(rows, vocab, k, eos_mode, ties)
    values, indices, lse = backend.topk(logits, bias, k, rules, index_dtype)
    assert values.shape == indices.shape == (rows, k) and lse.shape == (rows,)
    expected_values, expected_indices, expected_lse = ref.log_softmax_topk(logits, bias, k, **rules)
    np.testing.assert_allclose(lse, expected_lse, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(values, expected_values, rtol=0, atol=1e-5)
    scores = ref.token_scores(logits, expected_lse, bias, **rules)
    for row, position in np.argwhere(indices != expected_indices):  # allowed only between (near) ties
        chosen = scores[row, indices[row, position]]
        wanted = expected_values[row, position]
        assert chosen == wanted or abs(chosen - wanted) <= 1e-5, (row, position, chosen, wanted)
    assert (np.sort(indices, 1)[:, 1:] != np.sort(indices, 1)[:, :-1]).all(), "no token twice in a row"
    tied = values[:, 1:] == values[:, :-1]
    assert (indices[:, 1:] > indices[:, :-1])[tied].all(), "equal values: the smaller token id first"


class TorchBackend:
    """The kernels through the torch wrappers of cuda_kernels.py, with tensors on ``device`` (cuda, or cpu
    under the emulation)."""

    def __init__(self, device: str):
        self.device = device

    def tensor(self, array: np.ndarray, misaligned: bool = False) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        if not misaligned:
            return tensor.to(self.device, copy=True)
        storage = torch.empty(tensor.numel() + 1, dtype=tensor.dtype, device=self.device)
        return storage[1:].view(tensor.shape).copy_(tensor)  # contiguous, data_ptr one element off

    def quantize_write(self, x, cache, scales, step):
        cache_t, scales_t = self.tensor(cache), self.tensor(scales)
        ck.quantize_write(self.tensor(x), cache_t, scales_t, step)
        cache[...], scales[...] = cache_t.cpu().numpy(), scales_t.cpu().numpy()

    def attention(self, q, k_cache, v_cache, k_scale, v_scale, indir, n_steps, misaligned=False):
        out = ck.int8_cache_attention(self.tensor(q), self.tensor(k_cache, misaligned), self.tensor(v_cache, misaligned),
                                      self.tensor(k_scale), self.tensor(v_scale), self.tensor(indir), n_steps)
        return out.cpu().numpy()

    def topk(self, logits, bias, k, rules, index_dtype):
        values, indices, lse = ck.log_softmax_topk(self.tensor(logits), self.tensor(bias), k, **rules,
                                                   index_dtype=index_dtype)
        assert indices.dtype == index_dtype
        return values.cpu().numpy(), indices.cpu().numpy().astype(np.int64), lse.cpu().numpy()


def gpu_unavailable_reason() -> str:
    try:
        ck.require_cuda_kernels()
    except ck.CudaKernelsUnavailable as err:
        return f"needs a CUDA GPU with CuPy and NVRTC: {err}"
    return ""


GPU_UNAVAILABLE = gpu_unavailable_reason()


def gpu(test):
    """Marked ``gpu`` (select with -m gpu) and skipped, with the reason, where the kernels cannot run."""
    return pytest.mark.gpu(pytest.mark.skipif(bool(GPU_UNAVAILABLE), reason=GPU_UNAVAILABLE)(test))


QUANT_SHAPES = [(1, 1, 3, 1, 1), (2, 4, 7, 5, 36), (3, 8, 16, 4, 64), (2, 2, 5, 12, 128), (1, 3, 2, 2, 200)]
ATTENTION_CASES = [((1, 1, 1, 1, 1), 1), ((2, 4, 9, 5, 36), 9), ((3, 8, 64, 4, 64), 37), ((2, 2, 1024, 3, 128), 1024),
                   ((1, 2, 300, 6, 127), 255), ((2, 3, 20, 1, 64), 20)]
TOPK_CASES = [  # rows, vocab, k, eos_mode, ties
    (1, 5, 1, ref.EOS_NORMAL, False), (8, 1000, 10, ref.EOS_NORMAL, False), (12, 32003, 64, ref.EOS_NORMAL, False),
    (5, 777, 8, ref.EOS_FORBIDDEN, False), (5, 777, 8, ref.EOS_ONLY, False), (7, 4096, 20, ref.EOS_NORMAL, True),
    (3, 64, 64, ref.EOS_NORMAL, True), (40, 10000, 2, ref.EOS_NORMAL, False)]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("shape", QUANT_SHAPES)
@gpu
def test_gpu_quantize_write_matches_the_reference(shape, dtype):
    check_quantize_write(TorchBackend("cuda"), shape, dtype)


@pytest.mark.parametrize("misaligned", [False, True])
@pytest.mark.parametrize("shape,n_steps", ATTENTION_CASES)
@gpu
def test_gpu_int8_cache_attention_matches_the_reference(shape, n_steps, misaligned):
    check_attention(TorchBackend("cuda"), shape, n_steps, misaligned)


@pytest.mark.parametrize("rows,vocab,k,eos_mode,ties", TOPK_CASES)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@gpu
def test_gpu_log_softmax_topk_matches_the_reference(rows, vocab, k, eos_mode, ties, index_dtype):
    check_topk(TorchBackend("cuda"), rows, vocab, k, eos_mode, ties, index_dtype)


def cuda_tensor(array: np.ndarray) -> torch.Tensor:
    return TorchBackend("cuda").tensor(array)


@gpu
def test_gpu_quantized_cache_round_trip_on_a_side_stream():
    """quantize_write every step, then attend, all on a side stream behind a GPU sleep (a kernel launched
    on another stream would read the keys before they are written): close to float attention."""
    rng = np.random.default_rng(7)
    batch, num_heads, max_steps, beam, head_dim = 2, 4, 12, 3, 64
    keys = rng.standard_normal((max_steps, batch * beam, num_heads, head_dim)).astype(np.float32)
    values = rng.standard_normal(keys.shape).astype(np.float32)
    q = (rng.standard_normal((batch * beam, num_heads, head_dim)) * head_dim**-0.5).astype(np.float32)
    keys_gpu, values_gpu = cuda_tensor(keys), cuda_tensor(values)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        k_cache = torch.zeros(batch, num_heads, max_steps, beam, head_dim, dtype=torch.int8, device="cuda")
        v_cache = torch.zeros_like(k_cache)
        k_scale, v_scale = (torch.zeros(k_cache.shape[:4], device="cuda") for _ in range(2))
        key, value = torch.zeros_like(keys_gpu[0]), torch.zeros_like(values_gpu[0])
        for step in range(max_steps):
            if step == 0:
                torch.cuda._sleep(20_000_000)  # GPU cycles: the copies and kernels below wait behind it
            key.copy_(keys_gpu[step])
            value.copy_(values_gpu[step])
            ck.quantize_write(key, k_cache, k_scale, step)
            ck.quantize_write(value, v_cache, v_scale, step)
        identity = torch.arange(beam, dtype=torch.int32, device="cuda")[None, :, None].expand(batch, beam, max_steps)
        out = ck.int8_cache_attention(cuda_tensor(q), k_cache, v_cache, k_scale, v_scale, identity.contiguous(),
                                      max_steps)
    stream.synchronize()
    scores = np.einsum("rhd,trhd->rht", q, keys)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    np.testing.assert_allclose(out.cpu().numpy(), np.einsum("rht,trhd->rhd", weights, values), atol=0.05)


@pytest.fixture(scope="module")
def emulated_kernels(tmp_path_factory):
    """beam_search_kernels.cu built with g++ against the CUDA emulation of cuda_emulation.py: a ctypes
    library with launch_kernel."""
    return build_emulated_library(tmp_path_factory.mktemp("emulation"), ck)


@pytest.fixture
def emulated(emulated_kernels, monkeypatch):
    """TorchBackend on CPU tensors whose launches (grid, block and arguments exactly as the wrappers
    make them) go to the emulated kernels instead of CuPy."""
    patch_kernels_module(monkeypatch, ck, emulated_kernels)
    return TorchBackend("cpu")


@pytest.mark.parametrize("shape,dtype", [((1, 1, 3, 1, 1), np.float32), ((2, 4, 7, 5, 36), np.float32),
                                         ((2, 4, 7, 5, 36), np.float16), ((1, 3, 2, 2, 200), np.float16)])
@pytest.mark.timeout(120)  # a kernel bug can leave the emulated threads waiting at a barrier
def test_emulated_quantize_write_matches_the_reference(emulated, shape, dtype):
    check_quantize_write(emulated, shape, dtype)


@pytest.mark.parametrize("shape,n_steps,misaligned", [((1, 1, 1, 1, 1), 1, False), ((2, 2, 9, 3, 36), 9, False),
                                                      ((1, 2, 40, 2, 64), 33, False), ((1, 2, 40, 2, 64), 33, True),
                                                      ((1, 1, 20, 2, 127), 20, False)])
@pytest.mark.timeout(120)  # a kernel bug can leave the emulated threads waiting at a barrier
def test_emulated_int8_cache_attention_matches_the_reference(emulated, shape, n_steps, misaligned):
    check_attention(emulated, shape, n_steps, misaligned)


@pytest.mark.parametrize("rows,vocab,k,eos_mode,ties,index_dtype", [
    (1, 5, 1, ref.EOS_NORMAL, False, torch.int64), (3, 3000, 64, ref.EOS_NORMAL, False, torch.int32),
    (3, 777, 8, ref.EOS_FORBIDDEN, False, torch.int64), (3, 777, 8, ref.EOS_ONLY, False, torch.int64),
    (3, 2000, 20, ref.EOS_NORMAL, True, torch.int64), (3, 64, 64, ref.EOS_NORMAL, True, torch.int32)])
@pytest.mark.timeout(120)  # a kernel bug can leave the emulated threads waiting at a barrier
def test_emulated_log_softmax_topk_matches_the_reference(emulated, rows, vocab, k, eos_mode, ties, index_dtype):
    check_topk(emulated, rows, vocab, k, eos_mode, ties, index_dtype)


# ---- the decoder's int8 cache (inference/beam_cache.py) against the reference: torch path and kernels ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_torch_quantize_int8_matches_the_reference(dtype):
    rng = np.random.default_rng(8)
    x = torch.from_numpy(rng.standard_normal((6, 4, 36)) * rng.uniform(1e-3, 30, (6, 1, 1))).to(dtype)
    x[2, 1] = 0
    levels, scales = beam_cache.quantize_int8(x)
    expected_levels, expected_scales = ref.quantize(x.numpy())
    np.testing.assert_array_equal(levels.numpy(), expected_levels)
    np.testing.assert_array_equal(scales.numpy(), expected_scales)


def check_int8_kv_cache(kernels):
    """AttentionKVCache (int8) over 6 steps with beams reordered after each: what it stores and attends
    equals the reference on the cache it built and the indirection table it keeps."""
    rng = np.random.default_rng(9)
    batch, num_heads, max_steps, beam, head_dim = 2, 3, 6, 3, 16
    indirection = beam_cache.BeamIndirection(batch, beam, max_steps, torch.device("cpu"))
    cache = beam_cache.AttentionKVCache(indirection, num_heads, head_dim, "int8", torch.float32, torch.device("cpu"),
                                        kernels)
    expected_keys = np.zeros((batch, num_heads, max_steps, beam, head_dim), np.int8)
    expected_key_scales = np.zeros(expected_keys.shape[:4], np.float32)
    for step in range(max_steps):
        k, v, q = (rng.standard_normal((batch * beam, num_heads, head_dim)).astype(np.float32) for _ in range(3))
        cache.write(torch.from_numpy(k), torch.from_numpy(v))
        ref.quantize_write(k, expected_keys, expected_key_scales, step)
        np.testing.assert_array_equal(cache.key_scale[:, :, step].numpy(), expected_key_scales[:, :, step])
        written = cache.keys[:, :, step].numpy().astype(np.int32)
        assert np.abs(written - expected_keys[:, :, step]).max() <= (0 if kernels is None else 1)
        out = cache.attend(torch.from_numpy(q)).numpy()
        written_steps = [t[:, :, : step + 1].numpy() for t in (cache.keys, cache.values, cache.key_scale, cache.value_scale)]
        expected = ref.int8_cache_attention(q, *written_steps, indirection.table.numpy(), step + 1)
        np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
        indirection.advance(torch.from_numpy(rng.integers(0, beam, (batch, beam))))
    assert (indirection.table[:, :, :max_steps - 1] != torch.arange(beam)[None, :, None]).any(), "beams were reordered"


def test_torch_int8_kv_cache_matches_the_reference():
    check_int8_kv_cache(kernels=None)


@pytest.mark.timeout(120)  # a kernel bug can leave the emulated threads waiting at a barrier
def test_emulated_int8_kv_cache_matches_the_reference(emulated):
    check_int8_kv_cache(kernels=ck)
