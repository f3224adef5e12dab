"""C++ CPU kernels of the fast generator (``fairseq_accel/csrc``), built by ``pip install`` (setup.py) with the
machine's C++ compiler against the installed torch, with OpenMP: their loops split between torch's threads
(``torch.set_num_threads``, ``--accel-threads``).

``log_softmax_topk`` has the contract of the CUDA kernel of the same name (:mod:`.cuda_kernels`): the
generator's candidate step (log-softmax, fairseq's token rules, the hypothesis' score and the top k) in one
pass over the logits instead of four. ``cache_attention_step`` and ``memory_attention`` are a decoding
step's attention over the float32 self-attention cache (through the beam indirection) and over the encoder
memory, one call each instead of a dozen ops; ``window_convolution_step`` a causal depthwise convolution's
step (LSRA's lightweight convolution, SAN-M's FSMN) over the window buffer; ``int8_cache_attention_step`` the
self-attention step over the int8 cache (per-token scales, read without a float32 copy). Where the extension was not built (no compiler at install
time), the generator keeps its torch path and says so in one line.

The extension's ``DecoderStep`` runs a whole float32 decoder step in one call (csrc/decoder_step_cpu.cpp), and its
``BeamSearchLoop`` (csrc/beam_search_loop_cpu.cpp) the generator's search over it, steps and candidates, until
sentences finish; the Python step objects build the step from their own weights with the ``native_*`` helpers
here, and say with ``NativeStepUnsupported`` why a model keeps the Python step (float16 caches, int8
cross-attention memories, the int8 attention path, other activations). Its int8 layers (a compressed checkpoint's
``Int8Linear``) run the extension's int8 GEMM (``Int8Weights``, csrc/int8_gemm_cpu.cpp), as their Python module
does.
"""
from __future__ import annotations

import logging
import sys
from types import ModuleType
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from fairseq.modules import gelu
from torch import nn

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


def merge_candidates(values: torch.Tensor, ids: torch.Tensor, cands_to_ignore: torch.Tensor,
                     eos: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """Each sentence's best ``k`` candidates from its rows' best ``k`` (:func:`log_softmax_topk`'s ``[B * r, k]``):
    (scores, token ids, source beams, fairseq's eos mask ``[B, k]``, whether one of the first ``beam`` ends)."""
    return _cpu_kernels.merge_candidates(values, ids, cands_to_ignore, eos)


def advance_beams(cand_scores: torch.Tensor, cand_tokens: torch.Tensor, cand_beams: torch.Tensor,
                  eos_mask: torch.Tensor, cands_to_ignore: torch.Tensor, tokens: torch.Tensor, scores: torch.Tensor,
                  step: int) -> torch.Tensor:
    """fairseq's beam advance (the generator's ``_advance``): ``cands_to_ignore``, the token and score histories
    updated in place; returns each continuation's parent beam ``[B, beam]``."""
    return _cpu_kernels.advance_beams(cand_scores, cand_tokens, cand_beams, eos_mask, cands_to_ignore, tokens, scores,
                                      step)


def beam_search_loop(decoder_step, sentences: int, beam: int, pad: int, unk: int, eos: int, unk_penalty: float,
                     min_len: int, max_len: int, normalize_scores: bool, len_penalty: float):
    """fairseq's beam search for a batch of ``sentences`` over the C++ ``decoder_step`` (csrc/beam_search_loop_cpu.cpp):
    its ``run`` decodes steps until sentences finish (the kernels above in the generator's order, without Python
    between the steps), its ``hypotheses`` gives each sentence's finished (tokens, score, positional scores)."""
    return _cpu_kernels.BeamSearchLoop(decoder_step, sentences, beam, pad, unk, eos, unk_penalty, min_len, max_len,
                                       normalize_scores, len_penalty)


def compact_sentences(buffer: torch.Tensor, sentences: torch.Tensor, time_dim: int, steps: int) -> torch.Tensor:
    """The rows ``sentences`` (increasing) of the contiguous ``buffer`` moved to its front in place, only the first
    ``steps`` entries of ``time_dim`` copied; returns the front rows (``beam_cache.keep_rows``)."""
    return _cpu_kernels.compact_sentences(buffer, sentences, time_dim, steps)


def cache_attention_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                         table: torch.Tensor, step: int) -> torch.Tensor:
    """Write the step's keys/values ``[B * beam, H, D]`` into each hypothesis' slot of the float32 caches
    ``[B, H, T, beam, D]`` and return the attention of the pre-scaled queries ``[B * beam, H, D]`` over each
    hypothesis' steps ``0..step`` through the indirection ``table`` ``[B, beam, T]`` (``beam_cache``)."""
    return _cpu_kernels.cache_attention_step(q, k, v, keys, values, table, step)


def int8_cache_attention_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor,
                              values: torch.Tensor, key_scale: torch.Tensor, value_scale: torch.Tensor,
                              table: torch.Tensor, step: int) -> torch.Tensor:
    """:func:`cache_attention_step` over int8 caches with one scale per (head, token) (``[B, H, T, beam]``): keys and
    values quantized as ``beam_cache.quantize_int8`` does, read as levels times scales."""
    return _cpu_kernels.int8_cache_attention_step(q, k, v, keys, values, key_scale, value_scale, table, step)


def level_cache_attention_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor,
                               values: torch.Tensor, level_factors: torch.Tensor, level_steps: torch.Tensor,
                               table: torch.Tensor, step: int) -> torch.Tensor:
    """The int8 attention path's step over int8 caches of calibrated levels (``AttentionKVCache.level_step``)."""
    return _cpu_kernels.level_cache_attention_step(q, k, v, keys, values, level_factors, level_steps, table, step)


def advance_table(table: torch.Tensor, parents: torch.Tensor, steps: int) -> None:
    """The beam indirection table ``[B, beam, T]`` after a step, in place: hypothesis ``i`` of sentence ``b`` takes
    the slots of its parent ``parents[b, i]`` for steps ``0 .. steps - 1``."""
    _cpu_kernels.advance_table(table, parents, steps)


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


class NativeStepUnsupported(Exception):
    """The decoder runs the Python step, not the C++ one; the message says why."""


def int8_weights(levels: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor], input_scale: float,
                 zero_point: int) -> Optional["_cpu_kernels.Int8Weights"]:
    """An int8 layer's weights packed for the C++ int8 GEMM (``scales``: row scales times ``input_scale``), or None
    where the extension is not built."""
    if _cpu_kernels is None or levels.device.type != "cpu":
        return None
    return _cpu_kernels.Int8Weights(levels, scales.float().contiguous(), bias, input_scale, zero_point)


def native_linear(step: Callable) -> "_cpu_kernels.Linear":
    """The C++ twin of a linear step: a float32 ``TransposedLinear``'s own ``W^T`` and bias, an int8 layer's packed
    weights, or any other layer called back from C++."""
    from fairseq_accel.inference.int8_execution import TransposedLinear
    from fairseq_accel.modules.int8_linear import Int8Linear

    if isinstance(step, TransposedLinear):
        if step.weight_t.dtype != torch.float32:
            raise NativeStepUnsupported(f"a linear layer's weights are {step.weight_t.dtype}, not float32")
        return _cpu_kernels.Linear(step.weight_t, step.bias)
    if isinstance(step, Int8Linear) and step.native_weights() is not None:
        return _cpu_kernels.Linear(step.native_weights())
    return _cpu_kernels.Linear.calling(step)


def native_norm(norm: nn.LayerNorm) -> "_cpu_kernels.Norm":
    if not isinstance(norm, nn.LayerNorm) or len(norm.normalized_shape) != 1:
        raise NativeStepUnsupported(f"a norm is {type(norm).__name__}, not a LayerNorm over the channels")
    detach = lambda t: None if t is None else t.detach()
    return _cpu_kernels.Norm(detach(norm.weight), detach(norm.bias), norm.eps, norm.normalized_shape[0])


def native_activation(activation: Callable) -> int:
    """The C++ step's code of fairseq's relu or gelu (``utils.get_activation_fn``)."""
    codes = {F.relu: 0, gelu: 1}
    if activation not in codes:
        raise NativeStepUnsupported(f"activation {getattr(activation, '__name__', activation)} has no C++ step")
    return codes[activation]


def native_cross_attention(q: Callable, out: Callable, heads: int, head_dim: int,
                           level_steps: Optional[Tuple]) -> "_cpu_kernels.CrossAttention":
    """The C++ step's cross-attention over a float32 memory (its query and output projection steps)."""
    if level_steps is not None:
        raise NativeStepUnsupported("cross-attention takes the int8 attention path")
    return _cpu_kernels.CrossAttention(native_linear(q), native_linear(out), heads, head_dim)


def native_kernels() -> ModuleType:
    """The extension module, whose classes build the C++ decoder step."""
    return _cpu_kernels


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
