"""A CPU emulation of CUDA for the beam-search kernels, reusable by any test file.

``build_emulated_library`` builds the real ``fairseq_accel/kernels/beam_search_kernels.cu`` with g++
against a small emulation of the CUDA features it uses (``cuda_emulation_src/emulation_shim.h``: one
std::thread per CUDA thread, real barriers for __syncthreads and for warp shuffles and ballots), with
``cuda_emulation_src/driver.cpp`` as its entry point (``launch_kernel``). ``patch_kernels_module`` then
monkeypatches a kernels module (``fairseq_accel/inference/cuda_kernels.py``, loaded by file path or as
the package module ``fairseq_accel.inference.cuda_kernels``) so that its torch wrappers take CPU tensors
and their launches, with the grid, block and arguments they computed, go to that library instead of CuPy.
That checks the kernels' logic and the wrappers' argument packing without a GPU, but says nothing about
speed, occupancy or the GPU memory model.

Usage::

    @pytest.fixture(scope="module")
    def emulated_kernels(tmp_path_factory):
        return build_emulated_library(tmp_path_factory.mktemp("emulation"), cuda_kernels)

    @pytest.fixture
    def emulated(emulated_kernels, monkeypatch):
        patch_kernels_module(monkeypatch, cuda_kernels, emulated_kernels)

This module imports neither fairseq nor fairseq_accel (tests/test_cuda_kernels.py runs on GPU machines
without fairseq).
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

SOURCE_DIR = Path(__file__).resolve().parent / "cuda_emulation_src"
SHIM = SOURCE_DIR / "emulation_shim.h"
DRIVER = SOURCE_DIR / "driver.cpp"
KERNEL_FILE = "beam_search_kernels.cu"
# The kernels' float16 load (inline PTX), and what replaces it under the emulation.
HALF_LOAD = 'asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(p[i]));'
HALF_LOAD_EMULATED = "f = emu_half_to_float(p[i]);"
COMPILE_FLAGS = ("-std=c++17", "-O1", "-pthread", "-shared", "-fPIC", "-Wno-unknown-pragmas")
ARG_TYPES = (np.uint64, np.int32, np.float32)  # what the wrappers pass: pointers, ints and floats


def build_emulated_library(folder: Path, kernels_module: ModuleType) -> ctypes.CDLL:
    """Build ``beam_search_kernels.cu`` (as ``kernels_module.kernel_source`` inlines it) with g++ against
    the emulation, in ``folder``, and load it: a ctypes library whose ``launch_kernel`` runs a kernel.
    Skips the calling test (pytest.skip) when g++ is not installed."""
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("g++ is not installed: the kernels cannot be run under the CPU emulation")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    source = kernels_module.kernel_source(Path(kernels_module.KERNELS_DIR) / KERNEL_FILE)
    if HALF_LOAD not in source:
        raise AssertionError("the float16 load changed: update HALF_LOAD and the emulation (tests/cuda_emulation.py)")
    (folder / "kernels.cu").write_text(source.replace(HALF_LOAD, HALF_LOAD_EMULATED), encoding="utf-8")
    shutil.copyfile(SHIM, folder / SHIM.name)
    shutil.copyfile(DRIVER, folder / DRIVER.name)
    library = folder / "libfa_emulated.so"
    command = [compiler, *COMPILE_FLAGS, str(folder / DRIVER.name), "-o", str(library)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise AssertionError(f"g++ could not build the emulated kernels:\n{result.stderr}")
    return ctypes.CDLL(str(library))


def _ptr(array: np.ndarray) -> ctypes.c_void_p:
    assert array.flags.c_contiguous
    return array.ctypes.data_as(ctypes.c_void_p)


def _is_cpu(device) -> bool:
    return device is not None and torch.device(device).type == "cpu"


def patch_kernels_module(monkeypatch, kernels_module: ModuleType, library: ctypes.CDLL) -> None:
    """Monkeypatch ``kernels_module`` (undone with ``monkeypatch``) so that its wrappers run on CPU tensors
    under the emulation ``library`` (from ``build_emulated_library``):

    - ``_launch`` packs the launch's arguments and calls ``library.launch_kernel`` (CuPy and ``_ready``,
      which only ``_launch`` calls, are not used);
    - ``_cuda_device`` returns the tensors' device instead of refusing CPU tensors;
    - ``require_cuda_kernels`` and ``cuda_kernels_available`` accept a CPU device (any other device is
      checked as before), so code that checks availability first, e.g. a generator built with
      ``accel_kernels="cuda"`` on CPU, uses the emulated kernels.
    """
    def launch(name, device, grid, block, args):
        if device.type != "cpu" or not all(isinstance(arg, ARG_TYPES) for arg in args):
            raise AssertionError(f"{name}: emulated launch on {device} with argument types "
                                 f"{[type(arg).__name__ for arg in args]} (CPU tensors and numpy scalars expected)")
        slots = np.zeros(len(args), np.uint64)
        for slot, arg in zip(slots.view(np.uint8).reshape(-1, 8), args):
            slot[: arg.nbytes] = np.frombuffer(arg.tobytes(), np.uint8)
        sizes = np.array([arg.nbytes for arg in args], np.int32)
        status = library.launch_kernel(name.encode(), grid, block, len(args), _ptr(sizes), _ptr(slots))
        if status != 0:
            raise AssertionError(f"{name}: launch status {status} (see launch_kernel in cuda_emulation_src/driver.cpp)")

    original_require = kernels_module.require_cuda_kernels
    original_available = kernels_module.cuda_kernels_available

    def require_cuda_kernels(device=None):
        if not _is_cpu(device):
            original_require(device)

    def cuda_kernels_available(device=None):
        return _is_cpu(device) or original_available(device)

    monkeypatch.setattr(kernels_module, "_cuda_device", lambda function, tensors: next(iter(tensors.values())).device)
    monkeypatch.setattr(kernels_module, "_launch", launch)
    monkeypatch.setattr(kernels_module, "require_cuda_kernels", require_cuda_kernels)
    monkeypatch.setattr(kernels_module, "cuda_kernels_available", cuda_kernels_available)
