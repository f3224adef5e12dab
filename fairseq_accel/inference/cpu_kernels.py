"""C++ CPU kernels of the fast generator (``fairseq_accel/csrc``), built by ``pip install`` (setup.py) with the
machine's C++ compiler against the installed torch.

``log_softmax_topk`` has the contract of the CUDA kernel of the same name (:mod:`.cuda_kernels`): the
generator's candidate step (log-softmax, fairseq's token rules, the hypothesis' score and the top k) in one
pass over the logits instead of four. ``cache_attention_step`` and ``memory_attention`` are a decoding
step's attention over the float32 self-attention cache (through the beam indirection) and over the encoder
memory, one call each instead of a dozen ops; ``window_convolution_step`` a causal depthwise convolution's
step (LSRA's lightweight convolution, SAN-M's FSMN) over the window buffer. Where the extension was not built (no compiler at install
time), the generator keeps its torch path and says so in one line.
"""
from __future__ import annotations

import logging
import sys
from types import ModuleType
from typing import Optional, Tuple

import torch

try:
    from fairseq_accel import _cpu_kernels
    _UNAVAILABLE = None
except ImportError as error:  # not built: no C++ compiler when the plugin was installed
    _cpu_kernels = None
    _UNAVAILABLE = str(error)

logger = logging.getLogger(__name__)
_noticed = False


def cpu_kernels_available() -> bool:
    return _cpu_kernels is not None


def log_softmax_topk(logits: torch.Tensor, row_bias: torch.Tensor, k: int, pad_idx: int, unk_idx: int, eos_idx: int,
                     unk_penalty: float = 0.0, eos_mode: int = 0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values float32 [N, k], token ids int64 [N, k], logsumexp float32 [N]) of float32 CPU ``logits`` [N, V]
    and ``row_bias`` [N]; see ``cuda_kernels.log_softmax_topk`` for the rules."""
    return _cpu_kernels.log_softmax_topk(logits, row_bias, k, pad_idx, unk_idx, eos_idx, unk_penalty, eos_mode)


def cache_attention_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                         table: torch.Tensor, step: int) -> torch.Tensor:
    """Write the step's keys/values ``[B * beam, H, D]`` into each hypothesis' slot of the float32 caches
    ``[B, H, T, beam, D]`` and return the attention of the pre-scaled queries ``[B * beam, H, D]`` over each
    hypothesis' steps ``0..step`` through the indirection ``table`` ``[B, beam, T]`` (``beam_cache``)."""
    return _cpu_kernels.cache_attention_step(q, k, v, keys, values, table, step)


def memory_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, padding: torch.Tensor,
                     beam: int) -> torch.Tensor:
    """The attention of the pre-scaled queries ``[B * beam, H, D]`` over their sentence's float32 encoder
    keys/values ``[B, H, S, D]``, without the positions ``padding`` ``[B, S]`` marks (an empty tensor: none)."""
    return _cpu_kernels.memory_attention(q, keys, values, padding, beam)


def window_convolution_step(x: torch.Tensor, inputs: torch.Tensor, table: torch.Tensor, step: int,
                            weight: torch.Tensor) -> torch.Tensor:
    """Write the step's inputs ``[B * beam, C]`` into the window buffer ``[B, W - 1 + T, beam, C]`` and return
    each hypothesis' depthwise convolution of its last ``W`` inputs with ``weight`` ``[W, C]`` (``beam_cache``)."""
    return _cpu_kernels.window_convolution_step(x, inputs, table, step, weight)


def resolve_cpu_kernels(kernel_choice: str, device: torch.device) -> Optional[ModuleType]:
    """This module where the decoder runs on CPU, the kernels are built and ``--accel-kernels`` allows them
    (auto), else None; the first time they are missing, one notice line says why."""
    global _noticed
    if kernel_choice != "auto" or device.type != "cpu":
        return None
    if _cpu_kernels is None:
        if not _noticed:
            logger.warning(f"the fast generator's C++ CPU kernels are not built ({_UNAVAILABLE}); it uses its torch "
                           "path (the same results, slower). Reinstall with a C++ compiler: pip install -e .")
            _noticed = True
        return None
    return sys.modules[__name__]
