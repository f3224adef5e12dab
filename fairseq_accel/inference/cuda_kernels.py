"""CUDA kernels of the fast beam-search generator: NVRTC compilation, CuPy loading and torch wrappers.

The kernels (``fairseq_accel/kernels/*.cu``) are compiled at run time with NVRTC, so the plugin ships no
binaries and needs no CUDA toolkit: ``pip install 'fairseq_accel[gpu]'`` brings CuPy and NVRTC. The
wrappers take torch CUDA tensors, check them, and launch on torch's current stream.

This module imports only the standard library, numpy and torch at module level (CuPy lazily), and
nothing from fairseq or fairseq_accel, so that it can also be loaded by file path on a machine without
fairseq (``tests/test_cuda_kernels.py`` does that on GPU machines).
"""
from __future__ import annotations

import ctypes
import functools
import importlib.util
import operator
import re
import sys
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import torch

KERNELS_DIR = Path(__file__).resolve().parent.parent / "kernels"
NVRTC_OPTIONS = ("--std=c++17",)
INSTALL_HINT = "pip install 'fairseq_accel[gpu]' (CuPy and NVRTC: cupy-cuda12x nvidia-cuda-nvrtc-cu12)"

# Limits and thread counts of the kernels (beam_search_common.cuh, beam_search_kernels.cu);
# tests/test_cuda_kernels.py checks that they agree with the #defines.
MAX_HEAD_DIM = 128
MAX_STEPS = 1024
MAX_TOPK = 64
QUANT_WARPS = 4
ATTN_THREADS = 128
TOPK_THREADS = 256

# eos_mode of log_softmax_topk (enum EosMode in beam_search_common.cuh)
EOS_NORMAL = 0  # eos scored like any token
EOS_FORBIDDEN = 1  # minimum length not reached: eos gets -inf
EOS_ONLY = 2  # maximum length reached: every token but eos gets -inf

_INCLUDE = re.compile(r'^#include "([^"]+)"[ \t]*$', re.MULTILINE)


class CudaKernelsUnavailable(RuntimeError):
    """The CUDA kernels cannot run here; the message says why and how to fix it."""


class KernelCompileError(RuntimeError):
    """NVRTC rejected a kernel source; the message carries its log."""


# ---- sources and compilation ------------------------------------------------------------------------

def kernel_files() -> list[Path]:
    """Every ``.cu`` file of the kernels folder, sorted by name."""
    return sorted(KERNELS_DIR.glob("*.cu"))


def kernel_source(*paths: Path) -> str:
    """The text of one or more ``.cu`` files with their local ``#include "..."`` headers inlined (each
    once), so that NVRTC needs no include path and CuPy's compile cache sees every line of a kernel."""
    seen: set[str] = set()

    def expand(text: str, source: str) -> str:
        def include(match: re.Match) -> str:
            name = match.group(1)
            header = KERNELS_DIR / name
            if not header.is_file():
                raise FileNotFoundError(f"{source} includes {name}, which is not in {KERNELS_DIR}")
            if name in seen:
                return f"// {name}: already included"
            seen.add(name)
            return f"// ---- {name} ----\n" + expand(header.read_text(encoding="utf-8"), name)

        return _INCLUDE.sub(include, text)

    return "\n".join(expand(Path(path).read_text(encoding="utf-8"), Path(path).name) for path in paths)


@functools.lru_cache(maxsize=None)
def _preload_pip_nvrtc() -> Tuple[str, ...]:
    """Load every libnvrtc of pip's ``nvidia`` packages (nvidia/cuda_nvrtc/lib for CUDA 12, nvidia/cu13/lib
    for CUDA 13) into the process, before CuPy looks for NVRTC. CuPy >= 14 finds them itself (through
    cuda-pathfinder); older CuPy only searches the system library path, and then finds the library
    already loaded under its soname. Returns the paths loaded."""
    spec = importlib.util.find_spec("nvidia") if sys.platform.startswith("linux") else None
    if spec is None or not spec.submodule_search_locations:
        return ()
    loaded = []
    for root in spec.submodule_search_locations:
        for path in sorted(Path(root).glob("*/lib/libnvrtc.so.*")):
            if "builtins" in path.name or ".alt." in path.name:
                continue
            try:
                ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            loaded.append(str(path))
    return tuple(loaded)


def _nvrtc():
    """CuPy's NVRTC binding, with the library loaded (from pip's nvidia-cuda-nvrtc-cu12 in site-packages,
    or from the system)."""
    _preload_pip_nvrtc()
    try:
        from cupy_backends.cuda.libs import nvrtc
    except ImportError as err:
        raise CudaKernelsUnavailable(f"the CUDA kernels need CuPy, which is missing ({err}): {INSTALL_HINT}") from err
    try:
        nvrtc.getVersion()
    except Exception as err:  # noqa: BLE001  (CuPy reports a missing library with several exception types)
        raise CudaKernelsUnavailable(f"NVRTC (libnvrtc) could not be loaded ({err}): {INSTALL_HINT}") from err
    return nvrtc


def nvrtc_version() -> Tuple[int, int]:
    """(major, minor) of the NVRTC library that compiles the kernels."""
    return tuple(_nvrtc().getVersion())


def compile_to_ptx(arch: str = "compute_80") -> Dict[str, str]:
    """Compile every ``.cu`` of the kernels folder to PTX for ``arch`` with NVRTC, and return
    ``{file name: PTX}``. Needs no GPU, so CI can check that the kernels compile; raises
    ``KernelCompileError`` with NVRTC's log when one does not, or when NVRTC warns."""
    nvrtc = _nvrtc()
    ptx = {}
    for path in kernel_files():
        program = nvrtc.createProgram(kernel_source(path), path.name, (), ())
        try:
            try:
                nvrtc.compileProgram(program, NVRTC_OPTIONS + (f"--gpu-architecture={arch}",))
            except nvrtc.NVRTCError as err:
                log = nvrtc.getProgramLog(program)
                raise KernelCompileError(f"NVRTC could not compile {path.name} for {arch} ({err}):\n{log}") from None
            log = nvrtc.getProgramLog(program).strip()
            if log:
                raise KernelCompileError(f"NVRTC warned on {path.name} for {arch}:\n{log}")
            text = nvrtc.getPTX(program)
            ptx[path.name] = text.decode("utf-8").rstrip("\0") if isinstance(text, bytes) else text
        finally:
            nvrtc.destroyProgram(program)
    return ptx


@functools.lru_cache(maxsize=None)
def _module():
    """The kernels as one ``cupy.RawModule`` (compiled for the current device's architecture on first use,
    and cached by CuPy in memory per device and on disk)."""
    import cupy

    return cupy.RawModule(code=kernel_source(*kernel_files()), options=NVRTC_OPTIONS, backend="nvrtc")


@functools.lru_cache(maxsize=None)
def _kernel(name: str, device_index: int):
    """Kernel ``name`` loaded on ``device_index`` (call it with that device current)."""
    import cupy

    try:
        return _module().get_function(name)
    except cupy.cuda.compiler.CompileException as err:
        raise KernelCompileError(f"NVRTC could not compile the kernels for cuda:{device_index}:\n{err}") from None


# ---- availability -------------------------------------------------------------------------------------

def _require_cupy():
    _preload_pip_nvrtc()
    try:
        import cupy
    except ImportError as err:
        raise CudaKernelsUnavailable(f"the CUDA kernels need CuPy, which is missing ({err}): {INSTALL_HINT}") from err
    return cupy


def require_cuda_kernels(device: torch.device | str | int | None = None) -> None:
    """Raise ``CudaKernelsUnavailable`` (one line, with the fix) unless the kernels can run on ``device``
    (default: torch's current CUDA device)."""
    if not torch.cuda.is_available():
        raise CudaKernelsUnavailable("no CUDA device: torch.cuda.is_available() is False (CPU-only torch or no GPU)")
    device = torch.device("cuda") if device is None else torch.device(device)
    if device.type != "cuda":
        raise CudaKernelsUnavailable(f"the CUDA kernels need a CUDA device, not {device}")
    cupy = _require_cupy()
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as err:  # noqa: BLE001  (CuPy's CUDA runtime errors have no common public base)
        raise CudaKernelsUnavailable(f"CuPy sees no CUDA device ({err}); does cupy-cudaXXx match the driver?") from err
    index = torch.cuda.current_device() if device.index is None else device.index
    if index >= count:
        raise CudaKernelsUnavailable(f"CuPy sees {count} CUDA device(s), torch asks for cuda:{index}")
    _nvrtc()


def cuda_kernels_available(device: torch.device | str | int | None = None) -> bool:
    """Whether the kernels can run on ``device`` (CUDA, CuPy and NVRTC present); never raises."""
    try:
        require_cuda_kernels(device)
    except CudaKernelsUnavailable:
        return False
    return True


# ---- argument checks ----------------------------------------------------------------------------------

def _check_tensor(function: str, name: str, tensor: torch.Tensor, dtypes: Tuple[torch.dtype, ...], ndim: int) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{function}: {name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in dtypes:
        raise ValueError(f"{function}: {name} must be {' or '.join(map(str, dtypes))}, got {tensor.dtype}")
    if tensor.dim() != ndim:
        raise ValueError(f"{function}: {name} must have {ndim} dimensions, got shape {tuple(tensor.shape)}")
    if not tensor.is_contiguous():
        raise ValueError(f"{function}: {name} must be contiguous (call .contiguous())")


def _check_shape(function: str, name: str, tensor: torch.Tensor, expected: Tuple[int, ...], layout: str) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(f"{function}: {name} must have shape {layout} = {tuple(expected)}, got {tuple(tensor.shape)}")


def _cuda_device(function: str, tensors: Dict[str, torch.Tensor]) -> torch.device:
    """The one CUDA device of ``tensors`` (checked after their shapes, so that shape errors show anywhere)."""
    for name, tensor in tensors.items():
        if tensor.device.type != "cuda":
            raise CudaKernelsUnavailable(f"{function}: {name} is on {tensor.device}; the kernels need CUDA tensors")
    devices = {name: str(tensor.device) for name, tensor in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"{function}: all tensors must be on one device, got {devices}")
    return next(iter(tensors.values())).device


def _check_int_range(function: str, name: str, value: int, low: int, high: int) -> None:
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{function}: {name} must be an int, got {type(value).__name__}") from None
    if not low <= value <= high:
        raise ValueError(f"{function}: {name} must be in [{low}, {high}], got {value}")


@functools.lru_cache(maxsize=None)
def _ready(device_index: int) -> None:
    """require_cuda_kernels, checked once per device (a failure is not cached, so it is raised each time)."""
    require_cuda_kernels(torch.device("cuda", device_index))


def _launch(name: str, device: torch.device, grid: int, block: int, args: tuple) -> None:
    """Launch kernel ``name`` with ``grid`` blocks of ``block`` threads on torch's current stream of ``device``."""
    if not 0 < grid < 2**31:
        raise ValueError(f"{name}: {grid} blocks do not fit one CUDA grid")
    _ready(device.index)
    import cupy

    with cupy.cuda.Device(device.index):
        kernel = _kernel(name, device.index)
        with _cupy_stream(cupy, torch.cuda.current_stream(device), device.index):
            kernel((grid,), (block,), args)


def _cupy_stream(cupy, torch_stream: "torch.cuda.Stream", device_index: int):
    """torch's stream for CuPy: ``Stream.from_external`` (CuPy 14+, the CUDA stream protocol) where torch's
    stream speaks that protocol, else ``ExternalStream`` on its handle (older CuPy)."""
    if hasattr(torch_stream, "__cuda_stream__") and hasattr(cupy.cuda.Stream, "from_external"):
        return cupy.cuda.Stream.from_external(torch_stream)
    return cupy.cuda.ExternalStream(torch_stream.cuda_stream, device_index)


def _ptr(tensor: torch.Tensor) -> np.uint64:
    return np.uint64(tensor.data_ptr())


# ---- kernels ------------------------------------------------------------------------------------------

def quantize_write(x: torch.Tensor, cache: torch.Tensor, scales: torch.Tensor, step: int) -> None:
    """Quantize one decoding step's keys (or values) into the int8 cache, in place.

    x: float32 or float16 [N = B*beam, H, D], row r = b*beam + i; cache: int8 [B, H, T_max, beam, D];
    scales: float32 [B, H, T_max, beam]. Writes cache[b, h, step, i] = clamp(rint(x[r, h] * 127 / absmax),
    -127, 127) and scales[b, h, step, i] = absmax / 127 (0 and 0 for a zero vector), absmax = max |x[r, h]|.
    One scale per head and token keeps the cache 4x smaller than float32, with an error of at most
    absmax / 254 per element.
    """
    function = "quantize_write"
    _check_tensor(function, "x", x, (torch.float32, torch.float16), 3)
    _check_tensor(function, "cache", cache, (torch.int8,), 5)
    _check_tensor(function, "scales", scales, (torch.float32,), 4)
    batch, num_heads, max_steps, beam, head_dim = cache.shape
    _check_shape(function, "x", x, (batch * beam, num_heads, head_dim), "[B*beam, H, D]")
    _check_shape(function, "scales", scales, (batch, num_heads, max_steps, beam), "[B, H, T_max, beam]")
    _check_int_range(function, "step", step, 0, max_steps - 1)
    device = _cuda_device(function, {"x": x, "cache": cache, "scales": scales})
    pairs = batch * beam * num_heads
    if pairs == 0 or head_dim == 0:
        return
    name = "fa_quantize_write_f32" if x.dtype == torch.float32 else "fa_quantize_write_f16"
    grid = (pairs + QUANT_WARPS - 1) // QUANT_WARPS
    args = (_ptr(x), _ptr(cache), _ptr(scales), np.int32(batch), np.int32(beam), np.int32(num_heads),
            np.int32(max_steps), np.int32(head_dim), np.int32(step))
    _launch(name, device, grid, QUANT_WARPS * 32, args)


def int8_cache_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_scale: torch.Tensor,
    v_scale: torch.Tensor,
    indir: torch.Tensor,
    n_steps: int,
) -> torch.Tensor:
    """Attention of one step's queries over the first ``n_steps`` steps of the int8 K/V cache.

    q: float32 [B*beam, H, D], already scaled by D**-0.5; k_cache, v_cache: int8 [B, H, T_max, beam, D];
    k_scale, v_scale: float32 [B, H, T_max, beam]; indir: int32 [B, beam, T_max], where indir[b, i, t] is
    the beam slot holding hypothesis (b, i)'s key and value of time t, so reordering beams rewrites this
    small table instead of the cache. Returns float32 [B*beam, H, D]: sum_t softmax_t(q . k_t) v_t with
    k_t, v_t dequantized (int8 times their scale). A slot outside [0, beam) gives NaN for that row.
    """
    function = "int8_cache_attention"
    _check_tensor(function, "q", q, (torch.float32,), 3)
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check_tensor(function, name, cache, (torch.int8,), 5)
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        _check_tensor(function, name, scale, (torch.float32,), 4)
    _check_tensor(function, "indir", indir, (torch.int32,), 3)
    batch, num_heads, max_steps, beam, head_dim = k_cache.shape
    _check_shape(function, "v_cache", v_cache, tuple(k_cache.shape), "k_cache.shape [B, H, T_max, beam, D]")
    _check_shape(function, "q", q, (batch * beam, num_heads, head_dim), "[B*beam, H, D]")
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        _check_shape(function, name, scale, (batch, num_heads, max_steps, beam), "[B, H, T_max, beam]")
    _check_shape(function, "indir", indir, (batch, beam, max_steps), "[B, beam, T_max]")
    _check_int_range(function, "head dimension D", head_dim, 1, MAX_HEAD_DIM)
    _check_int_range(function, "n_steps", n_steps, 1, min(max_steps, MAX_STEPS))
    device = _cuda_device(function, {"q": q, "k_cache": k_cache, "v_cache": v_cache, "k_scale": k_scale,
                                     "v_scale": v_scale, "indir": indir})
    out = torch.empty_like(q)
    if batch * beam * num_heads == 0:
        return out
    args = (_ptr(q), _ptr(k_cache), _ptr(v_cache), _ptr(k_scale), _ptr(v_scale), _ptr(indir), _ptr(out),
            np.int32(batch), np.int32(beam), np.int32(num_heads), np.int32(max_steps), np.int32(head_dim),
            np.int32(n_steps))
    _launch("fa_int8_cache_attention", device, batch * beam * num_heads, ATTN_THREADS, args)
    return out


def log_softmax_topk(
    logits: torch.Tensor,
    row_bias: torch.Tensor,
    k: int,
    pad_idx: int,
    unk_idx: int,
    eos_idx: int,
    unk_penalty: float = 0.0,
    eos_mode: int = EOS_NORMAL,
    index_dtype: torch.dtype = torch.int64,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-softmax, fairseq's token rules and the top k of every hypothesis, in one kernel (a block per row).

    logits: float32 [N, V]; row_bias: float32 [N], the hypothesis' accumulated score. Per row,
    lp = logits - logsumexp(logits) (over all V, pad included, as fairseq), then lp[pad] = -inf,
    lp[unk] -= unk_penalty, eos_mode EOS_FORBIDDEN: lp[eos] = -inf, EOS_ONLY: every token but eos -inf;
    NaN becomes -inf. Returns (values float32 [N, k]: the k largest lp + row_bias, descending;
    indices index_dtype [N, k]: their token ids, the smaller id first among equal values; lse float32 [N]).
    Replaces the log_softmax, masking, add and topk kernels of a generator step and their [N, V] temporaries.
    """
    function = "log_softmax_topk"
    _check_tensor(function, "logits", logits, (torch.float32,), 2)
    _check_tensor(function, "row_bias", row_bias, (torch.float32,), 1)
    rows, vocab = logits.shape
    _check_shape(function, "row_bias", row_bias, (rows,), "[N]")
    if index_dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{function}: index_dtype must be torch.int64 or torch.int32, got {index_dtype}")
    _check_int_range(function, "k", k, 1, min(MAX_TOPK, vocab))
    for name, index in (("pad_idx", pad_idx), ("unk_idx", unk_idx), ("eos_idx", eos_idx)):
        _check_int_range(function, name, index, 0, vocab - 1)
    if eos_mode not in (EOS_NORMAL, EOS_FORBIDDEN, EOS_ONLY):
        raise ValueError(f"{function}: eos_mode must be 0 (normal), 1 (eos forbidden) or 2 (only eos), got {eos_mode}")
    if vocab >= 2**31:
        raise ValueError(f"{function}: vocabularies of 2**31 tokens or more are not supported, got {vocab}")
    device = _cuda_device(function, {"logits": logits, "row_bias": row_bias})
    values = torch.empty(rows, k, dtype=torch.float32, device=device)
    indices = torch.empty(rows, k, dtype=index_dtype, device=device)
    lse = torch.empty(rows, dtype=torch.float32, device=device)
    if rows == 0:
        return values, indices, lse
    name = "fa_log_softmax_topk_i64" if index_dtype == torch.int64 else "fa_log_softmax_topk_i32"
    args = (_ptr(logits), _ptr(row_bias), _ptr(values), _ptr(indices), _ptr(lse), np.int32(rows), np.int32(vocab),
            np.int32(k), np.int32(pad_idx), np.int32(unk_idx), np.int32(eos_idx), np.float32(unk_penalty),
            np.int32(eos_mode))
    _launch(name, device, rows, TOPK_THREADS, args)
    return values, indices, lse
