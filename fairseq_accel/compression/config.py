"""``fairseq-train`` options of the compression fine-tuning (progressive sparsity and ADMM weight
quantization), shared by the plugin's tasks, and their checks.

The options are a dataclass (``CompressionTrainingConfig``) so that ``translation_accel`` inherits them as
fields and ``speech_to_text_accel`` adds them to its argparse group; :func:`check_compression_options`
validates them once, when the task is set up, so a bad value stops the run before any data is read.
"""
from dataclasses import dataclass, field
from typing import Any, List, Sequence

from fairseq.dataclass import ChoiceEnum, FairseqDataclass

from fairseq_accel.compression.errors import CompressionOptionError
from fairseq_accel.compression.quantization_grid import SUPPORTED_BITS
from fairseq_accel.compression.sparsity_patterns import parse_pattern
from fairseq_accel.compression.parameter_scope import parse_overrides


@dataclass
class CompressionTrainingConfig(FairseqDataclass):
    sparsity_target: float = field(
        default=0.0,
        metadata={"help": "fraction of the compressed weights set to zero once --sparsity-end-update is reached "
                          "(0 <= S < 1; 0: no pruning). Masks are re-applied after every optimizer step"},
    )
    sparsity_schedule: ChoiceEnum(["cubic", "linear"]) = field(
        default="cubic",
        metadata={"help": "how the sparsity grows from 0 at --sparsity-start-update to the target at "
                          "--sparsity-end-update; cubic: Zhu & Gupta 2017 (arXiv 1710.01878), fast first, slow last"},
    )
    sparsity_start_update: int = field(default=0, metadata={"help": "update at which pruning begins"})
    sparsity_end_update: int = field(
        default=0, metadata={"help": "update at which the target sparsity is reached; the masks stay fixed after it"}
    )
    sparsity_frequency: int = field(
        default=100, metadata={"help": "re-estimate weight importance and recompute the masks every N updates"}
    )
    sparsity_importance: ChoiceEnum(["magnitude", "taylor"]) = field(
        default="magnitude",
        metadata={"help": "weight importance: |w|, or taylor: |w * dL/dw| summed over the updates since the last "
                          "mask update (first-order estimate of the loss change when w is removed)"},
    )
    sparsity_pattern: str = field(
        default="unstructured",
        metadata={"help": "unstructured; N:M (e.g. 2:4: N weights kept in every M consecutive inputs, for sparse "
                          "tensor cores; its sparsity is 1-N/M); row (whole output rows, i.e. output channels)"},
    )
    sparsity_threshold: ChoiceEnum(["layer", "global"]) = field(
        default="layer",
        metadata={"help": "layer: every weight matrix reaches the sparsity itself; global: one importance "
                          "threshold over all weights without an override, so layers end at different sparsities"},
    )
    sparsity_override: str = field(
        default="",
        metadata={"help": "per-parameter targets by regular expression on the parameter name, ';'-separated "
                          "REGEX=S pairs (first match wins), e.g. 'decoder\\.layers\\.0\\..*=0.3;fc2=0' (0: never "
                          "pruned); a pattern may also name an embedding or output projection outside the default scope"},
    )
    compress_embeddings: bool = field(
        default=False, metadata={"help": "also prune/quantize the token embeddings (default: every nn.Linear only)"}
    )
    compress_output_projection: bool = field(
        default=False,
        metadata={"help": "also prune/quantize the output projection(s) (decoder output layer, CTC head); "
                          "a projection tied to the embeddings is one tensor and follows either flag"},
    )
    admm_bits: int = field(
        default=0,
        metadata={"help": "ADMM weight quantization (Leng et al. 2018, arXiv 1707.09870) onto a symmetric "
                          "per-output-channel grid of this many bits: 8 or 4 (0: off)"},
    )
    admm_rho: float = field(
        default=1e-3, metadata={"help": "weight of the ADMM penalty rho/2 ||W - Z + U||^2 added to the loss"}
    )
    admm_start_update: int = field(default=0, metadata={"help": "update at which the ADMM penalty is switched on"})
    admm_update_frequency: int = field(
        default=100, metadata={"help": "update the grid copy Z = proj(W + U) and the dual U += W - Z every N updates"}
    )
    admm_finalize_update: int = field(
        default=0,
        metadata={"help": "from this update on, the weights are projected onto the grid after every step, so "
                          "every later checkpoint (set it <= --max-update) holds weights exactly on the grid "
                          "(0: never)"},
    )


#: Options that only mean something with pruning on, with ADMM on, or with either.
SPARSITY_OPTIONS = ("sparsity_schedule", "sparsity_start_update", "sparsity_end_update", "sparsity_frequency",
                    "sparsity_importance", "sparsity_pattern", "sparsity_threshold")
ADMM_OPTIONS = ("admm_rho", "admm_start_update", "admm_update_frequency", "admm_finalize_update")
SCOPE_OPTIONS = ("compress_embeddings", "compress_output_projection")


def _changed(cfg: Any, names: Sequence[str]) -> List[str]:
    """The command-line spelling of each option in ``names`` that differs from its default."""
    defaults = CompressionTrainingConfig()
    return ["--" + name.replace("_", "-") for name in names if getattr(cfg, name) != getattr(defaults, name)]


def _refuse_unused(cfg: Any, names: Sequence[str], missing: str) -> None:
    given = _changed(cfg, names)
    if given:
        raise CompressionOptionError(f"{', '.join(given)} would be ignored: add {missing}")


def pruning_enabled(cfg: Any) -> bool:
    return cfg.sparsity_target > 0 or bool(parse_overrides(cfg.sparsity_override))


def admm_enabled(cfg: Any) -> bool:
    return cfg.admm_bits != 0


def compression_enabled(cfg: Any) -> bool:
    """Whether the options ask for any pruning or ADMM at all."""
    return pruning_enabled(cfg) or admm_enabled(cfg)


def check_compression_options(cfg: Any) -> None:
    """Raise :class:`CompressionOptionError` (one line naming the option) for values that cannot work or
    that would be ignored."""
    if not 0.0 <= cfg.sparsity_target < 1.0:
        raise CompressionOptionError(f"--sparsity-target must be in [0, 1), got {cfg.sparsity_target}")
    pattern = parse_pattern(cfg.sparsity_pattern)
    if pruning_enabled(cfg):
        if cfg.sparsity_end_update <= cfg.sparsity_start_update:
            raise CompressionOptionError(
                f"--sparsity-end-update ({cfg.sparsity_end_update}) must be greater than --sparsity-start-update "
                f"({cfg.sparsity_start_update})"
            )
        if cfg.sparsity_frequency < 1:
            raise CompressionOptionError(f"--sparsity-frequency must be >= 1, got {cfg.sparsity_frequency}")
        targets = [cfg.sparsity_target] + [value for _, value in parse_overrides(cfg.sparsity_override)]
        for target in targets:
            if target > 0:
                pattern.check_target(target)
    else:
        _refuse_unused(cfg, SPARSITY_OPTIONS, "--sparsity-target S (0 < S < 1)")
    if admm_enabled(cfg):
        if cfg.admm_bits not in SUPPORTED_BITS:
            raise CompressionOptionError(
                f"--admm-bits must be one of {', '.join(map(str, SUPPORTED_BITS))} (or 0: off), got {cfg.admm_bits}"
            )
        if cfg.admm_rho <= 0:
            raise CompressionOptionError(f"--admm-rho must be > 0, got {cfg.admm_rho}")
        if cfg.admm_update_frequency < 1:
            raise CompressionOptionError(f"--admm-update-frequency must be >= 1, got {cfg.admm_update_frequency}")
    else:
        _refuse_unused(cfg, ADMM_OPTIONS, "--admm-bits 8 or 4")
    if not compression_enabled(cfg):
        _refuse_unused(cfg, SCOPE_OPTIONS, "--sparsity-target or --admm-bits")
