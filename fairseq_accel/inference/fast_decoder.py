"""The interface a decoder implements to run under the fast generator, and the registry of those that do.

A fairseq incremental decoder opts in either with a method ``build_fast_decoder(options, kernels) ->
FastDecoder`` or by registering a builder for its exact class with ``@register_fast_decoder(DecoderClass)``.
Exact classes, not subclasses: a subclass may change the maths, and a wrong fast step must not run silently.
``kernels`` is the kernel backend, resolved once by the generator builder (:func:`resolve_kernels`): the
CUDA kernels module, or None for the torch path.
"""
import copy
import logging
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Dict, List, Optional, Set, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fairseq_accel.inference.beam_cache import KV_CACHE_DTYPES, BeamState
from fairseq_accel.inference.cpu_kernels import NativeStepUnsupported

logger = logging.getLogger(__name__)
KERNEL_CHOICES = ("auto", "torch", "cuda")


class FastDecodingUnsupported(Exception):
    """The model cannot run under the fast generator; the message says why (it ends the notice)."""


@dataclass
class FastDecodingOptions:
    kv_cache_dtype: str = "fp32"  # self-attention K/V cache: fp32, fp16 or int8
    quantize_cross_kv: bool = False  # store cross-attention K/V in kv_cache_dtype too
    key_scale: str = "token"  # int8 keys: per token, or per channel too (see AccelGenerationConfig.key_scale)
    kernel_choice: str = "auto"  # auto: CUDA kernels when on CUDA and cupy is installed; torch; cuda (required)

    def __post_init__(self):
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"--kv-cache-dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if self.kernel_choice not in KERNEL_CHOICES:
            raise ValueError(f"--accel-kernels must be one of {KERNEL_CHOICES}, got {self.kernel_choice!r}")

    @property
    def cross_kv_dtype(self) -> str:
        return self.kv_cache_dtype if self.quantize_cross_kv else "fp32"


class FastDecoder:
    """One decoder's incremental step over beam caches.

    ``start`` allocates the caches for a batch; then, once per step, ``step`` gives the logits of every
    hypothesis' next token, and the generator calls ``keep`` (finished sentences leave) and ``advance``
    (which hypothesis each new one continues).
    """

    state: BeamState
    native_step = None  # the C++ step: None until built, False where the model has none
    native_caches: Optional[List[Tensor]] = None  # its cache tensors, where this batch runs it
    positions: Optional[Tensor] = None  # the decoder's positional embeddings by step, where it adds them

    def start(self, encoder_out: Dict[str, List[Tensor]], beam: int, max_steps: int) -> None:
        raise NotImplementedError

    def step(self, tokens: Tensor, output_rows: Optional[Tensor] = None) -> Tensor:
        """``tokens``: the ``[B * beam]`` tokens chosen at the previous step. Updates every hypothesis'
        state and returns fp32 logits ``[B * beam, V]``, or only those of ``output_rows``."""
        raise NotImplementedError

    def build_native_step(self):
        """The whole step as one C++ call (``cpu_kernels.native_kernels().DecoderStep``) with the logits of the
        Python step, or ``NativeStepUnsupported`` saying why there is none."""
        raise NativeStepUnsupported(f"{type(self).__name__} has no C++ step")

    def bind_native_step(self) -> None:
        """At the end of ``start``: run this batch's steps in C++ where the C++ kernels are in use and the model
        and its caches have a C++ step (built once; where not, one line says why)."""
        self.native_caches = None
        if self.state.cpu_kernels is None or self.native_step is False:
            return
        try:
            if self.native_step is None:
                self.native_step = self.build_native_step()
            self.native_caches = self.state.kernel_tensors()
        except NativeStepUnsupported as reason:
            said = self.__dict__.setdefault("notices", set())  # shared with the replicas: one line for all
            if str(reason) not in said:
                said.add(str(reason))
                logger.info(f"the fast decoder runs its Python step: {reason}")
            self.native_step = False

    def native_logits(self, tokens: Tensor, output_rows: Optional[Tensor]) -> Tensor:
        """:meth:`step` by the C++ step (where :meth:`bind_native_step` bound it for this batch)."""
        indirection = self.state.indirection
        return self.native_step(tokens, self.native_caches, indirection.table, indirection.step, self.positions,
                                output_rows)

    def run_native_search(self, loop, tokens: Tensor, scores: Tensor, cands_to_ignore: Tensor,
                          sentence_ids: List[int]) -> Tuple[int, List[int], bool]:
        """Steps of the C++ beam search ``loop`` (``cpu_kernels.beam_search_loop``) over the C++ step, from this
        batch's current step until sentences finish: (steps decoded, the active positions of the sentences that
        finished, whether the batch is done). The search's histories, ``cands_to_ignore`` and the beam table are
        updated in place."""
        indirection = self.state.indirection
        reached, finished, done = loop.run(tokens, scores, cands_to_ignore, sentence_ids, self.native_caches,
                                           indirection.table, indirection.step, self.positions)
        if not done:
            indirection.advanced_to(reached)
        return reached, finished, done

    def keep(self, sentences: Tensor) -> None:
        self.state.keep(sentences)
        if self.native_caches is not None:
            self.native_caches = self.state.kernel_tensors()

    def advance(self, parents: Tensor) -> None:
        self.state.advance(parents)

    def has_self_attention_cache(self) -> bool:
        """Whether the decoder keeps self-attention keys/values (what ``--kv-cache-dtype`` stores)."""
        return True

    def replica(self) -> "FastDecoder":
        """A decoder on the same weights with its own per-batch state: for a shard of a batch that another
        thread decodes at the same time (``sentence_parallel``). The step objects of ``fairseq_accel.inference``
        are copied; everything else they hold (tensors, torch modules, the C++ step, which takes the caches as
        arguments) is shared, so the weights are stored once."""
        self.__dict__.setdefault("notices", set())  # what bind_native_step said: a set, shared, not copied
        memo: Dict[int, object] = {}
        _share_all_but_step_objects(self, memo, set())
        return copy.deepcopy(self, memo)


def _share_all_but_step_objects(obj: object, memo: Dict[int, object], seen: Set[int]) -> None:
    """Fill ``memo`` so that ``copy.deepcopy`` copies only the containers and the objects of the fast decoding
    modules reachable from ``obj`` and shares everything else."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, (list, tuple)):
        children = obj
    elif isinstance(obj, dict):
        children = [*obj.keys(), *obj.values()]
    elif type(obj).__module__.startswith(__package__ + ".") and hasattr(obj, "__dict__"):
        children = vars(obj).values()
    else:
        memo[id(obj)] = obj
        return
    for child in children:
        _share_all_but_step_objects(child, memo, seen)


FastDecoderBuilder = Callable[[nn.Module, FastDecodingOptions, Optional[ModuleType]], FastDecoder]
_BUILDERS: Dict[type, FastDecoderBuilder] = {}


def register_fast_decoder(decoder_class: type) -> Callable[[FastDecoderBuilder], FastDecoderBuilder]:
    """Register a fast-decoder builder for instances of exactly ``decoder_class``."""

    def register(builder: FastDecoderBuilder) -> FastDecoderBuilder:
        _BUILDERS[decoder_class] = builder
        return builder

    return register


def build_fast_decoder(decoder: nn.Module, options: FastDecodingOptions, kernels: Optional[ModuleType] = None) -> FastDecoder:
    """The fast decoder of ``decoder`` on the ``kernels`` backend, or ``FastDecodingUnsupported`` saying why
    there is none."""
    if hasattr(decoder, "build_fast_decoder"):
        return decoder.build_fast_decoder(options, kernels)
    builder = _BUILDERS.get(type(decoder))
    if builder is None:
        raise FastDecodingUnsupported(f"decoder {type(decoder).__name__} has no fast decoding step")
    return builder(decoder, options, kernels)


def layer_norm(x: Tensor, norm: nn.Module) -> Tensor:
    """A LayerNorm module's computation without the module call."""
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def resolve_kernels(kernel_choice: str, device: torch.device) -> Optional[ModuleType]:
    """The CUDA kernels module to use on ``device``, or None for the torch path.

    ``--accel-kernels cuda`` without cupy or a CUDA device is an error; ``auto`` uses the kernels when the
    decoder runs on CUDA and cupy is installed.
    """
    if kernel_choice == "torch":
        return None
    from fairseq_accel.inference import cuda_kernels

    if kernel_choice == "cuda":
        cuda_kernels.require_cuda_kernels(device)
        return cuda_kernels
    return cuda_kernels if cuda_kernels.cuda_kernels_available(device) else None
