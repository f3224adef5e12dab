"""Decoder caches for beam search: preallocated, written in place, reordered by index instead of copied.

Stock fairseq keeps one growing cache per hypothesis: every step it ``torch.cat``s the new key/value on
and ``index_select``s every layer's whole cache into the new beam order, and it stores cross-attention
keys/values once per *beam*. Here (the cache-indirection scheme of FasterTransformer):

* every hypothesis writes its step-``t`` key/value into its own beam slot of a ``[B, H, T, beam, D]``
  buffer allocated once for the longest output of the batch;
* ``BeamIndirection`` records, for each hypothesis and time step, which slot holds its history; a beam
  reorder rewrites that small integer table, never the cache;
* attention reads the cache through the table: the scores of a hypothesis against all ``beam`` slots of a
  time step are one matmul, and a mask keeps only the slot of its own history;
* cross-attention keys/values are computed once per sentence and shared by its beams;
* finished sentences leave the batch (``keep``), the only time a cache is copied.

Row order is fairseq's: row ``b * beam + i`` is hypothesis ``i`` of sentence ``b``.
"""
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from fairseq_accel.inference.cpu_kernels import NativeStepUnsupported

KV_CACHE_DTYPES = ("fp32", "fp16", "int8")
_NO_PADDING = torch.empty(0, dtype=torch.bool)  # the C++ memory attention's "no position is padded"


@dataclass
class CacheBytes:
    """Bytes of decoder state by kind: self-attention keys/values, cross-attention keys/values, and the
    input windows of causal convolutions / FSMN memories."""

    self_attention: float = 0
    cross_attention: float = 0
    window: float = 0

    def __add__(self, other: "CacheBytes") -> "CacheBytes":
        return CacheBytes(self.self_attention + other.self_attention, self.cross_attention + other.cross_attention,
                          self.window + other.window)

    def __mul__(self, factor: float) -> "CacheBytes":
        return CacheBytes(self.self_attention * factor, self.cross_attention * factor, self.window * factor)


def _bytes_per(t: Tensor, *dims: int) -> int:
    """Bytes of one index of each of ``dims`` (e.g. one sentence and one step) of ``t``, from its shape (indexing
    made a tensor view per cache tensor whenever sentences finished: 59 -> 39 us per call on the mini transformer)."""
    return t.numel() // math.prod(t.size(d) for d in dims) * t.element_size() if t.numel() else 0


def quantize_int8(x: Tensor, dim: int = -1) -> Tuple[Tensor, Tensor]:
    """Symmetric int8 over ``dim``: ``q = rint(x * 127 / absmax)``, ``scale = absmax / 127`` (0 for an
    all-zero vector). The CUDA kernel ``quantize_write`` uses the same formula."""
    absmax = x.abs().amax(dim=dim, keepdim=True).float()
    inverse = torch.where(absmax > 0, 127.0 / absmax, torch.zeros_like(absmax))
    q = torch.round(x.float() * inverse).clamp_(-127, 127).to(torch.int8)
    return q, (absmax / 127.0).squeeze(dim)


class BeamIndirection:
    """For hypothesis ``i`` of sentence ``b`` at time ``t``, ``table[b, i, t]`` is the beam slot holding
    that step of its history; ``step`` is the time step being decoded."""

    def __init__(self, batch: int, beam: int, max_steps: int, device: torch.device, cpu_kernels=None):
        """``cpu_kernels``: the C++ CPU kernels module (the table's advance in one call), or None (torch)."""
        self.cpu_kernels = cpu_kernels
        self.beam = beam
        self.max_steps = max_steps
        self.step = 0
        self._slots = torch.arange(beam, device=device)
        # the same table as repeat makes, in half its time (6 against 14 us at batch 1)
        self.table = self._slots.view(1, beam, 1).expand(batch, beam, max_steps).contiguous()
        self._mask: Optional[Tensor] = None
        self._table_int32: Optional[Tensor] = None
        self._windows: Dict[Tuple[int, int, int], Tensor] = {}

    @property
    def batch(self) -> int:
        return self.table.size(0)

    def history_mask(self, dtype: torch.dtype) -> Tensor:
        """Additive ``[B, 1, beam, (step + 1) * beam]`` mask over (time, slot) keys: 0 where the slot holds
        the hypothesis' own history, -inf elsewhere. Built once per step, shared by every layer."""
        if self._mask is None or self._mask.dtype != dtype:
            steps = self.step + 1
            own = self.table[:, :, :steps, None] == self._slots  # B x beam x steps x beam
            mask = torch.zeros(own.shape, dtype=dtype, device=own.device).masked_fill_(~own, -math.inf)
            self._mask = mask.view(self.batch, 1, self.beam, steps * self.beam)
        return self._mask

    def window_index(self, width: int, time_stride: int, first_time: int) -> Tensor:
        """Flat row indices into a ``[B, T', beam, C]`` buffer viewed as ``[B * T' * beam, C]``: for every
        hypothesis, its slots at steps ``step - width + 1 .. step`` stored at times ``first_time + step``
        (``T' = time_stride``); steps before 0 read the buffer's zero history. Built once per step and
        width, shared by every layer."""
        key = (width, time_stride, first_time)
        if key not in self._windows:
            times = range(self.step - width + 1, self.step + 1)
            slots = self.table[:, :, max(times.start, 0) : times.stop]  # B x beam x (steps >= 0)
            if times.start < 0:  # the zero history: any slot will do
                slots = torch.cat([slots.new_zeros(self.batch, self.beam, -times.start), slots], dim=2)
            base = torch.arange(self.batch, device=slots.device).mul_(time_stride).view(-1, 1, 1)
            rows = (base + torch.arange(times.start + first_time, times.stop + first_time, device=slots.device)) * self.beam
            self._windows[key] = (rows + slots).view(-1)
        return self._windows[key]

    def table_int32(self) -> Tensor:
        """The table as a contiguous int32 tensor (the CUDA kernels' index type)."""
        if self._table_int32 is None:
            self._table_int32 = self.table.to(torch.int32).contiguous()
        return self._table_int32

    def advance(self, parents: Tensor) -> None:
        """After step ``step``: hypothesis ``i`` of sentence ``b`` continues hypothesis ``parents[b, i]``,
        so it inherits that one's history up to ``step``; later steps stay in its own slot."""
        steps = self.step + 1
        if self.cpu_kernels is not None and parents.dtype == torch.int64 and parents.is_contiguous():
            self.cpu_kernels.advance_table(self.table, parents, steps)
        else:
            index = parents.unsqueeze(-1).expand(-1, -1, steps)
            self.table[:, :, :steps] = self.table[:, :, :steps].gather(1, index)
        self.step += 1
        self._forget_derived()

    def advanced_to(self, step: int) -> None:
        """The C++ search loop advanced the table itself (``beam_search_loop_cpu.cpp``): ``step`` is decoded next."""
        self.step = step
        self._forget_derived()

    def keep(self, sentences: Tensor) -> None:
        self.table = self.table.index_select(0, sentences)
        self._forget_derived()

    def _forget_derived(self) -> None:
        self._mask = self._table_int32 = None
        self._windows = {}


def keep_rows(buffer: Tensor, sentences: Tensor, time_dim: int, steps: int, cpu_kernels=None) -> Tensor:
    """``buffer`` with only the ``sentences`` (dim 0) kept, moved to the front in place: only the first
    ``steps`` entries of ``time_dim`` (those written so far) are copied. Returns a view of the front. With the C++
    kernels: one in-place move of each kept row."""
    if cpu_kernels is not None and buffer.is_contiguous():
        return cpu_kernels.compact_sentences(buffer, sentences, time_dim, steps)
    used = buffer.narrow(time_dim, 0, steps)
    kept = used.index_select(0, sentences)
    front = buffer[: sentences.numel()]
    front.narrow(time_dim, 0, steps).copy_(kept)
    return front


def beam_attention(
    q: Tensor, keys: Tensor, values: Tensor, mask: Optional[Tensor], key_scale: Optional[Tensor] = None,
    value_scale: Optional[Tensor] = None,
) -> Tensor:
    """``softmax(q k^T * key_scale + mask) * value_scale @ v`` with ``q: [B, H, beam, D]`` (pre-scaled),
    ``keys/values: [B, H, M, D]`` (any dtype, computed in ``q``'s), scales ``[B, H, 1, M]``."""
    scores = torch.matmul(q, keys.to(q.dtype).transpose(-1, -2))
    if key_scale is not None:
        scores.mul_(key_scale)
    if mask is not None:
        scores.add_(mask)
    probs = torch.softmax(scores, dim=-1)
    if value_scale is not None:
        probs.mul_(value_scale)
    return torch.matmul(probs, values.to(q.dtype))


def _rows_to_beams(x: Tensor, beam: int) -> Tensor:
    """``[B * beam, H, D]`` rows to ``[B, H, beam, D]``."""
    rows, heads, dim = x.shape
    return x.view(rows // beam, beam, heads, dim).transpose(1, 2)


def _beams_to_rows(x: Tensor) -> Tensor:
    """``[B, H, beam, D]`` to ``[B * beam, H, D]``."""
    batch, heads, beam, dim = x.shape
    return x.transpose(1, 2).reshape(batch * beam, heads, dim)


class AttentionKVCache:
    """Self-attention keys and values of every hypothesis: ``[B, H, T, beam, D]``, fp32, fp16 or int8 with
    one scale per (head, token) (``[B, H, T, beam]``), dequantized inside the attention. With
    ``level_steps`` (the int8 attention path: the value of one level of each key and value channel, ``[H, D]``
    each), int8 keys/values are levels written as given, no scales are stored, and the attention folds the
    key steps into the query and the value steps into its output."""

    def __init__(
        self, indirection: BeamIndirection, heads: int, head_dim: int, dtype: str, compute_dtype: torch.dtype,
        device: torch.device, kernels=None, level_steps: Optional[Tuple[Tensor, Tensor]] = None, cpu_kernels=None,
    ):
        if dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv cache dtype must be one of {KV_CACHE_DTYPES}, got {dtype!r}")
        self.indirection = indirection
        self.dtype = dtype
        if level_steps is not None and dtype != "int8":
            raise ValueError(f"int8 level steps given for a {dtype} cache")
        self.level_steps = level_steps
        scaled_int8 = dtype == "int8" and level_steps is None
        self.kernels = kernels if scaled_int8 else None  # the CUDA kernels serve the per-token int8 cache only
        # the C++ CPU kernels serve the float32, the per-token int8 and the levels cache: write and attention in
        # one call
        self.cpu_kernels = cpu_kernels if compute_dtype == torch.float32 and dtype in ("fp32", "int8") else None
        storage = {"fp32": torch.float32, "fp16": torch.float16, "int8": torch.int8}[dtype]
        shape = (indirection.batch, heads, indirection.max_steps, indirection.beam, head_dim)
        # Not zeroed: attention reads steps 0..step only, and every row writes its own slot at every step.
        self.keys = torch.empty(shape, dtype=storage, device=device)
        self.values = torch.empty(shape, dtype=storage, device=device)
        self.key_scale = self.value_scale = None
        if scaled_int8:
            self.key_scale = torch.empty(shape[:-1], dtype=torch.float32, device=device)
            self.value_scale = torch.empty(shape[:-1], dtype=torch.float32, device=device)
        self.compute_dtype = compute_dtype

    def write(self, k: Tensor, v: Tensor) -> None:
        """Store step ``indirection.step``'s keys and values ``[B * beam, H, D]`` in each row's own slot."""
        step = self.indirection.step
        if self.kernels is not None:
            self.kernels.quantize_write(k.contiguous(), self.keys, self.key_scale, step)
            self.kernels.quantize_write(v.contiguous(), self.values, self.value_scale, step)
            return
        beam = self.indirection.beam
        for new, cache, scale in ((k, self.keys, self.key_scale), (v, self.values, self.value_scale)):
            new = _rows_to_beams(new, beam)  # B x H x beam x D
            if scale is None:
                cache[:, :, step].copy_(new)
            else:
                q, s = quantize_int8(new)
                cache[:, :, step].copy_(q)
                scale[:, :, step].copy_(s)

    def step(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """:meth:`write` the step's keys and values, then :meth:`attend` with its queries."""
        ind = self.indirection
        if self.cpu_kernels is not None and self.level_steps is not None:
            raise ValueError("the levels cache on the C++ kernels takes the projection's outputs: level_step")
        if self.cpu_kernels is not None and self.key_scale is not None:
            return self.cpu_kernels.int8_cache_attention_step(q, k, v, self.keys, self.values, self.key_scale,
                                                              self.value_scale, ind.table, ind.step)
        if self.cpu_kernels is not None:
            return self.cpu_kernels.cache_attention_step(q, k, v, self.keys, self.values, ind.table, ind.step)
        self.write(k, v)
        return self.attend(q)

    def level_step(self, q: Tensor, k: Tensor, v: Tensor, level_factors: Tensor, level_steps: Tensor) -> Tensor:
        """The int8 attention path on the C++ kernels (:meth:`step`'s twin, ``level_steps`` given): the int8
        projection's float32 outputs ``q, k, v [B * beam, H, D]`` rounded to their levels inside the kernel
        (``level_factors`` ``[3, H, D]``: 127 / calibrated absmax; ``level_steps``: its inverse), k and v
        stored as levels, the attention read from them."""
        ind = self.indirection
        return self.cpu_kernels.level_cache_attention_step(q, k, v, self.keys, self.values, level_factors,
                                                           level_steps, ind.table, ind.step)

    def attend(self, q: Tensor) -> Tensor:
        """Attention of the step's queries ``[B * beam, H, D]`` (pre-scaled) over each one's history."""
        if self.level_steps is not None:
            key_step, value_step = self.level_steps
            return self._attend(q * key_step) * value_step
        return self._attend(q)

    def _attend(self, q: Tensor) -> Tensor:
        ind = self.indirection
        steps = ind.step + 1
        if self.kernels is not None:
            return self.kernels.int8_cache_attention(
                q.float().contiguous(), self.keys, self.values, self.key_scale, self.value_scale,
                ind.table_int32(), steps,
            ).to(q.dtype)
        batch, heads, _, beam, dim = self.keys.shape
        keys = self.keys[:, :, :steps].view(batch, heads, steps * beam, dim)
        values = self.values[:, :, :steps].view(batch, heads, steps * beam, dim)
        key_scale = value_scale = None
        if self.key_scale is not None:
            key_scale = self.key_scale[:, :, :steps].reshape(batch, heads, 1, steps * beam)
            value_scale = self.value_scale[:, :, :steps].reshape(batch, heads, 1, steps * beam)
        out = beam_attention(
            _rows_to_beams(q, beam), keys, values, ind.history_mask(q.dtype), key_scale, value_scale
        )
        return _beams_to_rows(out)

    def kernel_tensors(self) -> List[Tensor]:
        """What the C++ decoder step reads and writes: the keys and values (int8: and their scales)."""
        if self.cpu_kernels is None:
            raise NativeStepUnsupported(f"the {self.dtype} self-attention cache has no C++ step")
        return [self.keys, self.values] + ([] if self.key_scale is None else [self.key_scale, self.value_scale])

    def keep(self, sentences: Tensor) -> None:
        steps = self.indirection.step + 1
        self.keys = keep_rows(self.keys, sentences, 2, steps, self.cpu_kernels)
        self.values = keep_rows(self.values, sentences, 2, steps, self.cpu_kernels)
        if self.key_scale is not None:
            self.key_scale = keep_rows(self.key_scale, sentences, 2, steps, self.cpu_kernels)
            self.value_scale = keep_rows(self.value_scale, sentences, 2, steps, self.cpu_kernels)

    def bytes_per_sentence(self, steps: int) -> CacheBytes:
        """Bytes a sentence's ``steps`` decoded steps occupy (all beams; keys, values and scales)."""
        tensors = [self.keys, self.values, self.key_scale, self.value_scale]
        return CacheBytes(self_attention=sum(_bytes_per(t, 0, 2) * steps for t in tensors if t is not None))


class WindowCache:
    """The inputs of a causal convolution / FSMN memory of width ``width``: every hypothesis writes its
    step into its own slot of ``[B, width - 1 + T, beam, C]`` (the first ``width - 1`` steps are the zero
    history a sentence starts from), and ``window()`` gathers its last ``width`` steps through the
    indirection, which is all the state such a layer has."""

    def __init__(self, indirection: BeamIndirection, width: int, channels: int, dtype: torch.dtype, device: torch.device,
                 cpu_kernels=None):
        self.indirection = indirection
        self.width = width
        self.cpu_kernels = cpu_kernels if dtype == torch.float32 else None  # the C++ step of convolve()
        shape = (indirection.batch, width - 1 + indirection.max_steps, indirection.beam, channels)
        self.inputs = torch.empty(shape, dtype=dtype, device=device)
        self.inputs[:, : width - 1].zero_()

    def write(self, x: Tensor) -> None:
        """Store the step's inputs ``[B * beam, C]``."""
        ind = self.indirection
        self.inputs[:, self.width - 1 + ind.step].copy_(x.view(ind.batch, ind.beam, -1))

    def window(self) -> Tensor:
        """``[B * beam, width, C]``: each hypothesis' inputs at steps ``step - width + 1 .. step``."""
        ind = self.indirection
        batch, time_stride, beam, channels = self.inputs.shape
        index = ind.window_index(self.width, time_stride, self.width - 1)
        return self.inputs.view(-1, channels).index_select(0, index).view(batch * beam, self.width, channels)

    def convolve(self, x: Tensor, weight: Tensor) -> Tensor:
        """:meth:`write` the step's inputs ``[B * beam, C]``, then each hypothesis' depthwise convolution of its
        last ``width`` inputs with ``weight``: ``[width, C]`` (fixed taps), or ``[B * beam, H, width]`` (each
        hypothesis' taps per head of ``C / H`` channels: a dynamic convolution)."""
        if self.cpu_kernels is not None:
            return self.cpu_kernels.window_convolution_step(x, self.inputs, self.indirection.table, self.indirection.step,
                                                            weight)
        self.write(x)
        if weight.dim() == 2:
            return (self.window() * weight).sum(dim=1)
        rows, heads, width = weight.shape
        return torch.einsum("nkhr,nhk->nhr", self.window().view(rows, width, heads, -1), weight).reshape(rows, -1)

    def kernel_tensors(self) -> List[Tensor]:
        if self.cpu_kernels is None:
            raise NativeStepUnsupported("a convolution window of another dtype than float32 has no C++ step")
        return [self.inputs]

    def keep(self, sentences: Tensor) -> None:
        self.inputs = keep_rows(self.inputs, sentences, 1, self.width + self.indirection.step, self.cpu_kernels)

    def bytes_per_sentence(self, steps: int) -> CacheBytes:
        """The state proper: the last ``width`` inputs of every beam."""
        return CacheBytes(window=self.width * _bytes_per(self.inputs, 0, 1))


class CrossAttentionMemory:
    """One cross-attention layer's encoder keys/values ``[B, H, S, D]``, computed once per sentence and
    shared by its beams; int8 optionally (values per token, keys per token or per channel), or int8 levels
    with ``level_steps`` (the int8 attention path, as in :class:`AttentionKVCache`)."""

    def __init__(self, keys: Tensor, values: Tensor, padding_mask: Optional[Tensor], beam: int, dtype: str,
                 key_scale_axis: str = "token", level_steps: Optional[Tuple[Tensor, Tensor]] = None,
                 cpu_kernels=None):
        if (level_steps is not None) != (keys.dtype == torch.int8):
            raise ValueError("int8 keys/values are levels: give their level steps, and only for them")
        self.beam = beam
        self.level_steps = None if level_steps is None else tuple(s[:, None, :] for s in level_steps)  # H x 1 x D
        self.compute_dtype = keys.dtype if keys.is_floating_point() else torch.float32
        self.mask = None
        if padding_mask is not None and padding_mask.any():
            self.mask = torch.zeros(padding_mask.shape, dtype=self.compute_dtype, device=keys.device)
            self.mask.masked_fill_(padding_mask, -math.inf)
            self.mask = self.mask[:, None, None, :]
        self.key_scale = self.value_scale = self.query_scale = None
        if dtype == "int8" and keys.is_floating_point():
            if padding_mask is not None:  # padded positions are masked out; keep them out of the scales too
                keep = ~padding_mask[:, None, :, None]
                keys, values = keys * keep, values * keep
            key_dim = -1 if key_scale_axis == "token" else -2
            keys, key_scale = quantize_int8(keys, dim=key_dim)
            values, value_scale = quantize_int8(values, dim=-1)
            if key_scale_axis == "token":
                self.key_scale = key_scale.unsqueeze(-2)  # B x H x 1 x S
            else:
                self.query_scale = key_scale.unsqueeze(-2)  # B x H x 1 x D, folded into the query
            self.value_scale = value_scale.unsqueeze(-2)
        elif dtype == "fp16":
            keys, values = keys.half(), values.half()
        self.keys, self.values = keys, values
        # the C++ CPU kernel serves float32 memories, leaving out the padded positions ([B, S], or None: none)
        self.cpu_kernels = cpu_kernels if keys.dtype == torch.float32 and level_steps is None else None
        self.padding = padding_mask if self.cpu_kernels is not None and self.mask is not None else None

    def attend(self, q: Tensor) -> Tensor:
        if self.cpu_kernels is not None:
            padding = _NO_PADDING if self.padding is None else self.padding
            return self.cpu_kernels.memory_attention(q, self.keys, self.values, padding, self.beam)
        q = _rows_to_beams(q, self.beam)
        if self.query_scale is not None:
            q = q * self.query_scale
        if self.level_steps is not None:
            q = q * self.level_steps[0]
        out = beam_attention(q, self.keys, self.values, self.mask, self.key_scale, self.value_scale)
        if self.level_steps is not None:
            out = out * self.level_steps[1]
        return _beams_to_rows(out)

    def kernel_tensors(self) -> List[Tensor]:
        if self.cpu_kernels is None:
            raise NativeStepUnsupported("a cross-attention memory of int8 or float16 has no C++ step")
        return [self.keys, self.values, _NO_PADDING if self.padding is None else self.padding]

    def keep(self, sentences: Tensor) -> None:
        if self.cpu_kernels is not None:  # float32 memories: moved in place, whole rows
            self.keys = keep_rows(self.keys, sentences, 2, self.keys.size(2), self.cpu_kernels)
            self.values = keep_rows(self.values, sentences, 2, self.values.size(2), self.cpu_kernels)
        for name in ("mask", "padding", "key_scale", "value_scale", "query_scale",
                     *(("keys", "values") if self.cpu_kernels is None else ())):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, tensor.index_select(0, sentences))

    def bytes_per_sentence(self, steps: int) -> CacheBytes:
        tensors = [self.keys, self.values, self.key_scale, self.value_scale, self.query_scale]
        return CacheBytes(cross_attention=sum(_bytes_per(t, 0) for t in tensors if t is not None))


class BeamState:
    """Everything a fast decoder keeps for one batch: the indirection and every layer's caches."""

    def __init__(self, batch: int, beam: int, max_steps: int, device: torch.device, kernels=None, cpu_kernels=None):
        self.indirection = BeamIndirection(batch, beam, max_steps, device, cpu_kernels)
        self.kernels = kernels  # the CUDA kernels module for the int8 caches, or None (torch)
        self.cpu_kernels = cpu_kernels  # the C++ CPU kernels module for float32 attention, or None (torch)
        self.caches: List = []

    @property
    def beam(self) -> int:
        return self.indirection.beam

    def add(self, cache):
        self.caches.append(cache)
        return cache

    def keep(self, sentences: Tensor) -> None:
        """Drop finished sentences: ``sentences`` are the indices of the ones that go on."""
        self.indirection.keep(sentences)
        for cache in self.caches:
            cache.keep(sentences)

    def advance(self, parents: Tensor) -> None:
        self.indirection.advance(parents)

    def kernel_tensors(self) -> List[Tensor]:
        """Every cache's tensors for the C++ decoder step, in the order its layers take them."""
        return [tensor for cache in self.caches for tensor in cache.kernel_tensors()]

    def bytes_per_sentence(self, steps: int) -> CacheBytes:
        """Bytes one sentence decoded for ``steps`` steps holds (all beams), by kind of cache."""
        return sum((cache.bytes_per_sentence(steps) for cache in self.caches), CacheBytes())
