"""Parameters and Mult-Adds of a fairseq encoder-decoder model, the way the Lite Transformer paper reports them.

Lite Transformer (Wu et al., arXiv:2004.11886) compares models by the Mult-Adds (multiply-accumulates) of
translating a sentence of 30 tokens. Here that is counted exactly, by running the model once:

* **Mult-Adds**: every multiply-accumulate of a matrix product in a teacher-forced forward pass of one
  sentence of ``src_len`` source tokens and ``tgt_len`` target tokens (batch 1, no padding) through the
  encoder and the decoder: linear layers, attention ``Q·Kᵀ`` and ``·V`` (the full matrices, causal or not),
  convolution taps (zero padding included) and the linear layers that predict dynamic kernels. Embedding
  lookups and element-wise work (normalisation, softmax, activations, residual additions) are not counted.
  The decoder's **output projection onto the vocabulary is excluded** from the total and reported on its own,
  because it depends on the vocabulary, not on the architecture.
* **Parameters without embeddings**: all parameters except the token embeddings, learned positional
  embeddings and the output projection when it is a separate (untied) vocabulary-size matrix.
* **Speech models** (fairseq's ``S2TTransformerModel`` and its subclasses, e.g. ``s2t_sanm``): the source is
  ``src_len`` frames of ``input_feat_per_channel x input_channels`` features (80 x 1, the recipes' filterbanks,
  for a model built from an arch), and the front-end's products (convolutions, projections) count too.

Counting uses ``torch.utils.flop_counter.FlopCounterMode`` (Mult-Adds = FLOPs / 2), which sees the
matrix products that einsum, grouped convolutions and fused attention are lowered to.
"""
import argparse
import difflib
import math
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
from fairseq import checkpoint_utils
from fairseq.data import Dictionary
from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_REGISTRY, FairseqEncoderDecoderModel
from fairseq.models import build_model as fairseq_build_model
from fairseq.models.speech_to_text import S2TTransformerModel
from fairseq.modules import LearnedPositionalEmbedding
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

SENTENCE_LENGTH = 30  # the paper's convention for Mult-Adds
_SEARCH_VOCAB_SIZE = 16
# What fairseq's speech_to_text task gives a speech model: 80-dim filterbanks (as the recipes) from its data
# config, and its default --max-source-positions / --max-target-positions.
SPEECH_TASK_ARGS = {"input_feat_per_channel": 80, "input_channels": 1, "max_source_positions": 6000,
                    "max_target_positions": 1024}
# The size options shown beside the counts (and given to the default baseline), where a model has them.
SIZE_OPTIONS = (
    "encoder_embed_dim", "decoder_embed_dim",
    "encoder_ffn_embed_dim", "decoder_ffn_embed_dim",
    "encoder_layers", "decoder_layers",
    "encoder_attention_heads", "decoder_attention_heads",
)


class ProfileError(ValueError):
    """A model that cannot be profiled as asked (unknown arch, missing checkpoint, unsupported layout)."""


@dataclass(frozen=True)
class ParameterCounts:
    """Parameter counts; shared (tied) parameters are counted once."""

    total: int
    token_embeddings: int
    positional_embeddings: int  # learned positions only; sinusoidal ones have no parameters
    output_projection: int  # 0 when the projection is tied to the decoder's token embeddings

    @property
    def non_embedding(self) -> int:
        return self.total - self.token_embeddings - self.positional_embeddings - self.output_projection


@dataclass(frozen=True)
class MultAdds:
    """Mult-Adds of one teacher-forced forward pass; ``decoder`` excludes the output projection."""

    encoder: int
    decoder: int
    output_projection: int
    src_len: int
    tgt_len: int

    @property
    def total(self) -> int:
        """Encoder + decoder, without the output projection (the paper's convention)."""
        return self.encoder + self.decoder


@dataclass(frozen=True)
class ModelProfile:
    """What ``fairseq-accel-profile`` reports for one model."""

    arch: str
    sizes: Dict[str, int]
    src_vocab_size: Optional[int]  # None for a speech model (its source is feature frames)
    tgt_vocab_size: int
    parameters: ParameterCounts
    mult_adds: MultAdds

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready form, derived totals included."""
        parameters = asdict(self.parameters)
        parameters["non_embedding"] = self.parameters.non_embedding
        mult_adds = asdict(self.mult_adds)
        mult_adds["total"] = self.mult_adds.total
        return {
            "arch": self.arch,
            "sizes": dict(self.sizes),
            "src_vocab_size": self.src_vocab_size,
            "tgt_vocab_size": self.tgt_vocab_size,
            "parameters": parameters,
            "mult_adds": mult_adds,
        }


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of fused CPU attention (``Q·Kᵀ`` then ``·V``, shapes ``batch x heads x time x dim``).

    ``FlopCounterMode`` has formulas for the GPU attention kernels but not for this CPU one, which
    fairseq's ``MultiheadAttention`` reaches through ``F.multi_head_attention_forward``.
    """
    batch, heads, query_len, key_dim = query_shape
    key_len = key_shape[-2]
    value_dim = value_shape[-1]
    return 2 * batch * heads * query_len * key_len * (key_dim + value_dim)


_EXTRA_FLOP_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}


def mult_adds_of(function: Callable[..., Any], *args, **kwargs) -> Tuple[Any, int]:
    """Call ``function`` and return its result with the Mult-Adds of the matrix products it ran."""
    with FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS) as counter:
        result = function(*args, **kwargs)
    return result, counter.get_total_flops() // 2


def output_projection(decoder: nn.Module) -> nn.Module:
    """The decoder's projection onto the target vocabulary.

    fairseq's transformer-style decoders keep it as ``decoder.output_projection``; otherwise the decoder's
    only ``nn.Linear`` with one output per vocabulary entry is taken.
    """
    projection = getattr(decoder, "output_projection", None)
    if isinstance(projection, nn.Module):
        return projection
    if getattr(decoder, "adaptive_softmax", None) is not None:
        raise ProfileError("decoders with an adaptive softmax are not supported (no single output projection)")
    vocab_size = len(decoder.dictionary)
    candidates = [m for m in decoder.modules() if isinstance(m, nn.Linear) and m.out_features == vocab_size]
    if len(candidates) != 1:
        raise ProfileError(
            f"cannot tell the output projection of {type(decoder).__name__}: {len(candidates)} linear layers "
            f"have {vocab_size} (= vocabulary size) outputs"
        )
    return candidates[0]


def count_parameters(model: FairseqEncoderDecoderModel) -> ParameterCounts:
    """Count all parameters and the embedding-like ones that ``non_embedding`` leaves out."""
    token, positional = {}, {}
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            target = positional if isinstance(module, LearnedPositionalEmbedding) else token
            target.update((id(p), p) for p in module.parameters())
    projection = {
        id(p): p for p in output_projection(model.decoder).parameters() if id(p) not in token
    }
    return ParameterCounts(
        total=sum(p.numel() for p in model.parameters()),
        token_embeddings=sum(p.numel() for p in token.values()),
        positional_embeddings=sum(p.numel() for p in positional.values()),
        output_projection=sum(p.numel() for p in projection.values()),
    )


def source_features(model_cfg: Any) -> Optional[int]:
    """Features per source frame of a speech model's options; None for a text model."""
    if getattr(model_cfg, "input_feat_per_channel", None) is None:
        return None
    return model_cfg.input_feat_per_channel * model_cfg.input_channels


def _source(model: FairseqEncoderDecoderModel, length: int, features: Optional[int]) -> torch.Tensor:
    """The encoder input of one source: tokens, or ``length`` frames of ``features`` for a speech model."""
    if features is None:
        return _sentence(model.encoder.dictionary, length)
    if length < 1:
        raise ProfileError(f"source length must be >= 1 frame, got {length}")
    return torch.zeros(1, length, features)


def _sentence(dictionary: Dictionary, length: int) -> torch.Tensor:
    """One sentence of ``length`` ordinary (non-special) tokens, shape ``(1, length)``."""
    if length < 1:
        raise ProfileError(f"sentence length must be >= 1, got {length}")
    return torch.full((1, length), dictionary.nspecial, dtype=torch.long)


@contextmanager
def _eval_on_one_thread(model: nn.Module) -> Iterator[None]:
    """Eval mode on one intra-op thread, restored afterwards.

    The products of one short sentence are tiny: extra threads only add overhead (and contention).
    """
    was_training, threads = model.training, torch.get_num_threads()
    model.eval()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        model.train(was_training)
        torch.set_num_threads(threads)


def count_mult_adds(
    model: FairseqEncoderDecoderModel,
    src_len: int = SENTENCE_LENGTH,
    tgt_len: int = SENTENCE_LENGTH,
    features: Optional[int] = None,
) -> MultAdds:
    """Mult-Adds of a teacher-forced forward pass of one ``src_len`` -> ``tgt_len`` sentence (eval mode).

    ``features``: for a speech model, the features per source frame (:func:`source_features`); the source
    is then ``src_len`` frames. The encoder and the decoder are run as fairseq's generator runs them; the
    output projection's share is measured by re-running that module on the inputs it received, and
    subtracted from the decoder's.
    """
    projection = output_projection(model.decoder)
    src_tokens = _source(model, src_len, features)
    prev_output_tokens = _sentence(model.decoder.dictionary, tgt_len)
    projection_inputs: List[Tuple[torch.Tensor, ...]] = []
    hook = projection.register_forward_hook(lambda module, inputs, output: projection_inputs.append(inputs))
    with _eval_on_one_thread(model), torch.no_grad():
        try:
            encoder_out, encoder = mult_adds_of(model.encoder, src_tokens, src_lengths=torch.tensor([src_len]))
            _, decoder = mult_adds_of(model.decoder, prev_output_tokens, encoder_out=encoder_out)
        finally:
            hook.remove()
        projection_mult_adds = sum(mult_adds_of(projection, *inputs)[1] for inputs in projection_inputs)
    return MultAdds(encoder, decoder - projection_mult_adds, projection_mult_adds, src_len, tgt_len)


def model_class(arch: str) -> type:
    """The registered encoder-decoder model class of ``arch``; ProfileError with close matches otherwise."""
    if arch not in ARCH_MODEL_REGISTRY:
        matches = difflib.get_close_matches(arch, encoder_decoder_archs(), n=5, cutoff=0.6)
        hint = f"; close matches: {', '.join(matches)}" if matches else "; no close match among registered archs"
        raise ProfileError(f"unknown arch '{arch}'{hint}")
    cls = ARCH_MODEL_REGISTRY[arch]
    if not issubclass(cls, FairseqEncoderDecoderModel):
        raise ProfileError(f"arch '{arch}' ({cls.__name__}) is not an encoder-decoder translation model")
    return cls


def encoder_decoder_archs() -> List[str]:
    """Registered architecture names of encoder-decoder models, sorted."""
    return sorted(a for a, c in ARCH_MODEL_REGISTRY.items() if issubclass(c, FairseqEncoderDecoderModel))


def resolve_arch_args(arch: str, overrides: Mapping[str, Any]) -> argparse.Namespace:
    """Model options as fairseq-train would resolve them: explicit CLI defaults, ``overrides``, arch defaults.

    ``overrides`` are option destinations (``encoder_embed_dim``), as parsed from the model's options.
    """
    parser = argparse.ArgumentParser(argument_default=argparse.SUPPRESS)
    model_class(arch).add_args(parser)
    args = parser.parse_args([])
    if issubclass(model_class(arch), S2TTransformerModel):
        vars(args).update(SPEECH_TASK_ARGS)
    vars(args).update(overrides)
    args.arch = arch
    ARCH_CONFIG_REGISTRY[arch](args)
    return args


class _DictionaryTask:
    """The two attributes a translation model's ``build_model`` reads from its task."""

    def __init__(self, source_dictionary: Dictionary, target_dictionary: Dictionary):
        self.source_dictionary = source_dictionary
        self.target_dictionary = target_dictionary


def _dictionary(size: int) -> Dictionary:
    dictionary = Dictionary()
    if size <= dictionary.nspecial:
        raise ProfileError(f"vocabulary size must exceed the {dictionary.nspecial} special symbols, got {size}")
    for index in range(size - len(dictionary)):
        dictionary.add_symbol(f"w{index}")
    return dictionary


def build_model(model_cfg: Any, src_vocab_size: Optional[int], tgt_vocab_size: int) -> FairseqEncoderDecoderModel:
    """Build an untrained model from resolved options (a Namespace or a checkpoint's ``cfg.model``).

    Dictionaries are placeholders of the given sizes; equal sizes (or no source vocabulary, for a speech
    model) give one joined dictionary, which ``--share-all-embeddings`` needs.
    """
    target = _dictionary(tgt_vocab_size)
    source = target if src_vocab_size in (None, tgt_vocab_size) else _dictionary(src_vocab_size)
    model = fairseq_build_model(model_cfg, _DictionaryTask(source, target))
    if not isinstance(model, FairseqEncoderDecoderModel):
        raise ProfileError(f"{type(model).__name__} is not an encoder-decoder model")
    return model.eval()


def load_checkpoint_model(path: str) -> Tuple[FairseqEncoderDecoderModel, Any]:
    """Rebuild the model of a fairseq checkpoint with its weights; return it and its ``cfg.model``.

    Vocabulary sizes come from the saved token embeddings, so the training data is not needed.
    """
    if not os.path.isfile(path):
        raise ProfileError(f"checkpoint not found: {path}")
    state = checkpoint_utils.load_checkpoint_to_cpu(path)
    model_cfg = state["cfg"].model
    weights = state["model"]
    try:
        tgt_vocab_size = weights["decoder.embed_tokens.weight"].size(0)
        speech = source_features(model_cfg) is not None
        src_vocab_size = None if speech else weights["encoder.embed_tokens.weight"].size(0)
    except KeyError as err:
        raise ProfileError(f"{path}: no {err} in the saved weights; is it an encoder-decoder checkpoint?") from err
    model = build_model(model_cfg, src_vocab_size, tgt_vocab_size)
    model.load_state_dict(weights, strict=True, model_cfg=model_cfg)
    return model, model_cfg


def size_options(model_cfg: Any) -> Dict[str, int]:
    """The ``SIZE_OPTIONS`` that ``model_cfg`` sets."""
    return {name: getattr(model_cfg, name) for name in SIZE_OPTIONS if getattr(model_cfg, name, None) is not None}


def profile_model(
    model: FairseqEncoderDecoderModel,
    model_cfg: Any,
    src_len: int = SENTENCE_LENGTH,
    tgt_len: int = SENTENCE_LENGTH,
) -> ModelProfile:
    """Parameters and Mult-Adds of ``model`` built from ``model_cfg``."""
    arch = getattr(model_cfg, "arch", None) or getattr(model_cfg, "_name")
    features = source_features(model_cfg)
    return ModelProfile(
        arch=arch,
        sizes=size_options(model_cfg),
        src_vocab_size=None if features is not None else len(model.encoder.dictionary),
        tgt_vocab_size=len(model.decoder.dictionary),
        parameters=count_parameters(model),
        mult_adds=count_mult_adds(model, src_len, tgt_len, features),
    )


def profile_arch(
    arch: str,
    overrides: Optional[Mapping[str, Any]] = None,
    vocab_size: Optional[int] = 32000,
    src_len: int = SENTENCE_LENGTH,
    tgt_len: int = SENTENCE_LENGTH,
    tgt_vocab_size: Optional[int] = None,
) -> ModelProfile:
    """Profile an untrained ``arch`` with option ``overrides``.

    The source vocabulary has ``vocab_size`` entries, the target one ``tgt_vocab_size`` (default: the same,
    one joined dictionary); a speech model has no source vocabulary.
    """
    model_cfg = resolve_arch_args(arch, overrides or {})
    model = build_model(model_cfg, vocab_size, tgt_vocab_size or vocab_size)
    return profile_model(model, model_cfg, src_len, tgt_len)


def closest_width(mult_adds_at: Callable[[int], int], target: int, step: int, max_width: int = 16384) -> int:
    """The multiple of ``step`` whose Mult-Adds are closest to ``target`` (the smaller one on a tie).

    ``mult_adds_at(width)`` must grow with the width. Scaling a model's width ``w`` (FFN in proportion)
    gives Mult-Adds ``a·w² + b·w``: matrix products grow with w², attention over a fixed sentence and
    convolution taps with w. Two small probes fit that curve and place a first guess; a walk along the
    multiples of ``step`` then brackets the target exactly, typically after four calls of ``mult_adds_at``.
    """
    cache: Dict[int, int] = {}

    def at(multiple: int) -> int:
        if multiple * step > max_width:
            raise ProfileError(f"no width up to {max_width} reaches {target} Mult-Adds")
        if multiple not in cache:
            cache[multiple] = mult_adds_at(multiple * step)
        return cache[multiple]

    quadratic = (at(2) - 2 * at(1)) / 2  # f(k) = quadratic·k² + linear·k, k = width / step
    linear = at(1) - quadratic
    if quadratic > 0:
        guess = (math.sqrt(linear**2 + 4 * quadratic * target) - linear) / (2 * quadratic)
    else:
        guess = target / at(1)
    high = max(1, math.floor(guess))
    while high > 1 and at(high - 1) >= target:
        high -= 1
    while at(high) < target:
        high += 1
    # Now at(high) >= target and, unless high == 1, at(high - 1) < target.
    if high > 1 and target - at(high - 1) <= at(high) - target:
        return (high - 1) * step
    return high * step


def match_width(
    arch: str,
    options: Mapping[str, Any],
    target: int,
    src_len: int = SENTENCE_LENGTH,
    tgt_len: int = SENTENCE_LENGTH,
) -> Dict[str, Any]:
    """``options`` with the encoder and decoder width of ``arch`` set so its Mult-Adds come closest to ``target``.

    Both sides get the same embedding dimension, a multiple of 8 and of the attention head counts; each
    FFN keeps its ratio to the embedding dimension that ``options`` (or the arch defaults) give.
    """
    resolved = resolve_arch_args(arch, options)
    missing = [name for name in SIZE_OPTIONS if getattr(resolved, name, None) is None]
    if missing:
        raise ProfileError(f"cannot scale the width of '{arch}': it has no {', '.join(missing)} option")
    ffn_ratios = {
        side: getattr(resolved, f"{side}_ffn_embed_dim") / getattr(resolved, f"{side}_embed_dim")
        for side in ("encoder", "decoder")
    }
    step = math.lcm(8, resolved.encoder_attention_heads, resolved.decoder_attention_heads)

    def scaled(width: int) -> Dict[str, Any]:
        sized = dict(options)
        for side, ratio in ffn_ratios.items():
            sized[f"{side}_embed_dim"] = width
            sized[f"{side}_ffn_embed_dim"] = round(ratio * width)
        return sized

    def mult_adds_at(width: int) -> int:
        # The vocabulary does not change the counted Mult-Adds; a tiny one keeps each build fast.
        model_cfg = resolve_arch_args(arch, scaled(width))
        model = build_model(model_cfg, _SEARCH_VOCAB_SIZE, _SEARCH_VOCAB_SIZE)
        return count_mult_adds(model, src_len, tgt_len, source_features(model_cfg)).total

    return scaled(closest_width(mult_adds_at, target, step))
