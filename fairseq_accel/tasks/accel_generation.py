"""What the accel tasks add to ``fairseq-generate``: ``--accel-generator fast`` and its cache options, and
``--accel-generator ctc_greedy`` for speech models with a CTC head.

``build_generator`` first builds fairseq's own generator from the same options (so every stock option keeps
its meaning), then swaps in ``FastSequenceGenerator`` when the model and options allow it. Otherwise it
falls back to the stock generator with a one-line notice saying why, or stops with that reason under
``--no-accel-fallback``.
"""
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from fairseq.data import Dictionary
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.search import BeamSearch
from fairseq.sequence_generator import SequenceGenerator

from fairseq_accel.compat.checkpoint_files import COMPRESSED_KEY
from fairseq_accel.inference.beam_cache import KV_CACHE_DTYPES
from fairseq_accel.inference.cpu_kernels import resolve_cpu_kernels
from fairseq_accel.inference.ctc_generator import CTCGreedyGenerator
from fairseq_accel.inference.fast_decoder import (
    KERNEL_CHOICES,
    FastDecodingOptions,
    FastDecodingUnsupported,
    build_fast_decoder,
    resolve_kernels,
)
from fairseq_accel.inference.fast_generator import FastSequenceGenerator
from fairseq_accel.inference.int8_execution import INT8_MIN_WEIGHTS, convert_to_int8
from fairseq_accel.inference.thread_choice import ThreadChooser
from fairseq_accel.models.ctc_head import CTCHeadError
from fairseq_accel.tasks.task_options import TaskOptionsMixin

logger = logging.getLogger(__name__)


class AccelGenerationError(ValueError):
    """Options that contradict each other or the model; the message names the option and the fix."""


@dataclass
class AccelGenerationConfig(FairseqDataclass):
    accel_generator: ChoiceEnum(["stock", "fast", "ctc_greedy"]) = field(
        default="stock",
        metadata={"help": "fast: fairseq_accel's generator (preallocated caches reordered by index, cross-attention "
                          "K/V once per sentence); same search and results as stock, falls back to stock with a notice "
                          "where a model or option is not supported. ctc_greedy: speech models trained with "
                          "joint_ctc_attention only: the best path of the encoder's CTC head, no decoder (one "
                          "hypothesis per sentence; the search options --beam, --lenpen, ... do not apply)"},
    )
    kv_cache_dtype: ChoiceEnum(list(KV_CACHE_DTYPES)) = field(
        default="fp32",
        metadata={"help": "storage of the fast generator's self-attention key/value cache; int8: symmetric, one "
                          "scale per head and token, dequantized inside the attention (about 4x smaller); for a "
                          "compressed checkpoint with calibrated output ranges, the int8 levels of its int8 "
                          "projections as they are, one fixed scale per channel (the int8 attention path)"},
    )
    quantize_cross_kv: bool = field(
        default=False, metadata={"help": "store the cross-attention keys/values in --kv-cache-dtype too"}
    )
    key_scale: ChoiceEnum(["token", "channel"]) = field(
        default="token",
        metadata={"help": "int8 keys: one scale per head and token, or per channel too: self-attention key channels "
                          "are balanced by their projection's norms first (q.k unchanged), cross-attention keys get "
                          "one scale per channel over the source"},
    )
    accel_kernels: ChoiceEnum(list(KERNEL_CHOICES)) = field(
        default="auto",
        metadata={"help": "auto: CUDA kernels (int8 cache attention, fused log-softmax + top-k) when decoding on "
                          "CUDA with cupy installed (pip install 'fairseq_accel[gpu]'), the C++ CPU kernel (fused "
                          "log-softmax + top-k, built by pip install) on CPU, torch otherwise; cuda: require the "
                          "CUDA kernels; torch: no kernels"},
    )
    accel_threads: str = field(
        default="auto",
        metadata={"help": "CPU threads of the fast generator: auto (default) decodes the first batch with torch's "
                          "thread count, then two batches each with it and with 1, in turn, keeps the faster (one log "
                          "line says which; --accel-parallel says how the threads share a batch) and measures "
                          "again when it slows down 3x (another process took the cores: OpenMP threads then wait "
                          "for each other at every small operation); torch: leave torch's count as set "
                          "(OMP_NUM_THREADS, torch.set_num_threads); N: that many"},
    )
    accel_parallel: ChoiceEnum(["sentences", "operations"]) = field(
        default="sentences",
        metadata={"help": "how the fast generator's N > 1 CPU threads share a batch: sentences (default) splits it "
                          "into N shards of every N-th sentence, each decoded on one thread (same hypotheses; a "
                          "step's small operations gain little from OpenMP threads); operations runs every "
                          "operation on N threads (torch's intra-op parallelism). Batches of one sentence always "
                          "run by operations"},
    )
    no_accel_fallback: bool = field(
        default=False, metadata={"help": "stop with the reason instead of falling back to the stock generator"}
    )
    compressed_exec: ChoiceEnum(["int8", "float"]) = field(
        default="int8",
        metadata={"help": "checkpoints of fairseq-accel-compress only: int8 runs every linear layer that has int8 "
                          "(or int4) weights and a calibrated input scale as an int8 GEMM, with either generator; "
                          "float expands the weights to float32 and runs the model as usual"},
    )
    int8_min_weights: int = field(
        default=INT8_MIN_WEIGHTS,
        metadata={"help": "--compressed-exec int8 runs only linear layers of at least this many weights in int8; "
                          "smaller ones run float32 on the same stored levels. Default: 0 (every layer) with the "
                          "plugin's own int8 GEMM (its C++ extension), which beats float32 at every size; 256x1024 "
                          "where only fbgemm's is there (its per-call cost makes smaller int8 layers slower)"},
    )


def _stock_only_reason(stock, models: List) -> Optional[str]:
    """Why the fast generator cannot stand in for ``stock`` (None if it can)."""
    if len(models) != 1:
        return f"an ensemble of {len(models)} models"
    if type(stock) is not SequenceGenerator:
        return f"{type(stock).__name__} (--print-alignment, --score-reference or another generator)"
    if type(stock.search) is not BeamSearch:
        return f"search strategy {type(stock.search).__name__} (--sampling, --diverse-beam-groups, --constraints, ...)"
    if stock.lm_model is not None:
        return "language model fusion (--lm-path)"
    if stock.match_source_len:
        return "--match-source-len"
    if stock.token_indices_to_suppress is not None:
        return "tokens to suppress"
    if getattr(models[0], "encoder", None) is None:
        return "a decoder-only model"
    if any(getattr(module, "apply_during_inference", False) for module in models[0].modules()):
        return "--retain-dropout"
    return None


def _check_fast_only_options(cfg) -> None:
    """Options that only mean something to the fast generator, or only with a quantized cache, are
    rejected where they would be ignored (one line naming each such option and the fix)."""
    if cfg.accel_generator != "fast":
        given = [name for name, value in (
            ("--kv-cache-dtype", cfg.kv_cache_dtype != "fp32"), ("--quantize-cross-kv", cfg.quantize_cross_kv),
            ("--key-scale", cfg.key_scale != "token"), ("--accel-kernels", cfg.accel_kernels != "auto"),
            ("--accel-threads", cfg.accel_threads != "auto"), ("--accel-parallel", cfg.accel_parallel != "sentences"),
            ("--no-accel-fallback", cfg.no_accel_fallback),
        ) if value]
        if given:
            raise AccelGenerationError(f"{', '.join(given)} apply to the fast generator: add --accel-generator fast")
    elif cfg.kv_cache_dtype == "fp32":
        given = [name for name, value in (
            ("--quantize-cross-kv", cfg.quantize_cross_kv), ("--key-scale channel", cfg.key_scale != "token"),
        ) if value]
        if given:
            raise AccelGenerationError(
                f"{', '.join(given)} apply to a quantized cache: add --kv-cache-dtype int8 (or fp16 for --quantize-cross-kv)"
            )
    elif cfg.kv_cache_dtype == "fp16" and cfg.key_scale != "token":
        raise AccelGenerationError("--key-scale channel sets int8 key scales: use --kv-cache-dtype int8")


def build_ctc_generator(models: List, cfg, tgt_dict: Dictionary) -> CTCGreedyGenerator:
    """The CTC best-path generator of a single model with a CTC head (one-line errors otherwise)."""
    _check_fast_only_options(cfg)
    if len(models) != 1:
        raise AccelGenerationError(f"--accel-generator ctc_greedy decodes one model, got an ensemble of {len(models)}")
    try:
        return CTCGreedyGenerator(models[0], tgt_dict)
    except CTCHeadError as error:
        raise AccelGenerationError(
            f"--accel-generator ctc_greedy needs a model trained with a CTC loss (--criterion joint_ctc_attention "
            f"--ctc-weight > 0): {error}"
        ) from None


def build_accel_generator(stock, models: List, cfg) -> object:
    """``stock`` itself, or the fast generator built from its settings, as ``cfg`` (the task config) asks.

    The kernel backend is resolved here, once, and handed to the fast decoder and the generator."""
    _check_fast_only_options(cfg)
    if cfg.accel_generator != "fast":
        return stock
    try:
        threads = ThreadChooser(cfg.accel_threads)
    except ValueError as error:
        raise AccelGenerationError(str(error)) from None
    options = FastDecodingOptions(
        kv_cache_dtype=cfg.kv_cache_dtype, quantize_cross_kv=cfg.quantize_cross_kv,
        key_scale=cfg.key_scale, kernel_choice=cfg.accel_kernels,
    )
    try:
        reason = _stock_only_reason(stock, models)
        if reason is not None:
            raise FastDecodingUnsupported(reason)
        model = models[0]
        device = next(model.parameters()).device
        kernels = resolve_kernels(options.kernel_choice, device)
        decoder = build_fast_decoder(model.decoder, options, kernels)
    except FastDecodingUnsupported as unsupported:
        if cfg.no_accel_fallback:
            raise AccelGenerationError(f"--accel-generator fast cannot decode this: {unsupported} (--no-accel-fallback)")
        logger.warning(f"--accel-generator fast: using fairseq's SequenceGenerator instead, because of {unsupported}")
        return stock
    if options.kv_cache_dtype != "fp32" and not decoder.has_self_attention_cache() and not options.quantize_cross_kv:
        raise AccelGenerationError(
            f"--kv-cache-dtype {options.kv_cache_dtype}: {type(model.decoder).__name__} keeps no self-attention "
            "key/value cache, so there is nothing to store in it; add --quantize-cross-kv to store its "
            "cross-attention keys/values that way"
        )
    return FastSequenceGenerator(stock, model, decoder, kernels or resolve_cpu_kernels(options.kernel_choice, device),
                                 threads, parallel_sentences=cfg.accel_parallel == "sentences")


def build_task_generator(models: List, cfg, tgt_dict: Dictionary, build_stock: Callable[[], object],
                         compressed_section: Optional[Dict[str, Any]] = None) -> object:
    """The generator ``fairseq-generate`` gets from an accel task, for a model of a compressed checkpoint
    (``compressed_section``) run as ``--compressed-exec`` asks: the CTC generator for ``--accel-generator
    ctc_greedy``, otherwise :func:`build_accel_generator` over the stock generator ``build_stock()`` makes."""
    apply_compressed_execution(models, compressed_section, cfg)
    if cfg.accel_generator == "ctc_greedy":
        return build_ctc_generator(models, cfg, tgt_dict)
    return build_accel_generator(build_stock(), models, cfg)


def apply_compressed_execution(models: List, section: Optional[Dict[str, Any]], cfg) -> None:
    """Run the model of a compressed checkpoint (its ``section``, None for other checkpoints) in int8 as
    ``--compressed-exec`` asks: its linear layers become int8 layers in place. The compressed-checkpoint
    options are refused where they would be ignored."""
    given = [name for name, value in (("--compressed-exec float", cfg.compressed_exec != "int8"),
                                      ("--int8-min-weights", cfg.int8_min_weights != INT8_MIN_WEIGHTS)) if value]
    if section is None and given:
        raise AccelGenerationError(f"{', '.join(given)} apply to checkpoints written by fairseq-accel-compress; "
                                   "this one is not")
    if cfg.compressed_exec != "int8" and cfg.int8_min_weights != INT8_MIN_WEIGHTS:
        raise AccelGenerationError("--int8-min-weights chooses the int8 layers: it does not apply to --compressed-exec float")
    if section is None or cfg.compressed_exec != "int8":
        return
    if len(models) != 1:
        raise AccelGenerationError(f"--compressed-exec int8 decodes one compressed model, got an ensemble of "
                                   f"{len(models)}; decode them one at a time or add --compressed-exec float")
    if "activations" not in section:
        logger.warning("the compressed checkpoint has no activation calibration (made without --data), so its "
                       "layers run in float32; calibrate it: fairseq-accel-compress --path CKPT --data DATA --out ...")
        return
    names = convert_to_int8(models[0], section, "the compressed checkpoint", cfg.int8_min_weights)
    logger.info(f"--compressed-exec int8: {len(names)} linear layers run as int8 GEMMs (those of at least "
                f"{cfg.int8_min_weights:,} weights: --int8-min-weights)")


class AccelGenerationMixin(TaskOptionsMixin):
    """Put before the stock task class: ``class TranslationAccelTask(AccelGenerationMixin, TranslationTask)``."""

    compressed_section: Optional[Dict[str, Any]] = None  # from a compressed checkpoint's task_state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        self.compressed_section = state_dict.pop(COMPRESSED_KEY, None)
        super().load_state_dict(state_dict)

    def build_generator(self, models, args, *rest, **kwargs):
        return build_task_generator(
            models, self.task_options(), self.target_dictionary,
            lambda: super(AccelGenerationMixin, self).build_generator(models, args, *rest, **kwargs),
            self.compressed_section,
        )
