"""Which weights the compression fine-tuning touches, and at which target sparsity each.

Default scope: the weight of every ``nn.Linear`` of the model except its output projections (the decoder's
``output_projection`` and the CTC head ``encoder.ctc_proj``). ``--compress-embeddings`` and
``--compress-output-projection`` add those; ``--sparsity-override 'REGEX=S;...'`` gives the parameters whose
name matches ``REGEX`` (``re.search``, first matching pair wins) their own target ``S``, 0 leaving them
dense, and may name an embedding or output projection outside the default scope. A parameter registered
under several names (tied embeddings, shared layers) is one entry, under its first name.
"""
import re
from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, List, Optional, Tuple

from torch import nn

from fairseq_accel.compression.errors import CompressionOptionError

#: Names of the modules that map hidden states to the vocabulary.
OUTPUT_PROJECTIONS = ("output_projection", "ctc_proj")


@dataclass(frozen=True)
class ScopedWeight:
    """One weight matrix in scope: its name, the parameter, and its own target sparsity (None: the
    global/default target applies)."""

    name: str
    parameter: nn.Parameter
    override: Optional[float]


def parse_overrides(text: str) -> List[Tuple[re.Pattern, float]]:
    """``'REGEX=S;REGEX=S'`` → [(compiled regex, S)], with 0 <= S < 1."""
    pairs = []
    for item in filter(None, (part.strip() for part in (text or "").split(";"))):
        regex, _, value = item.rpartition("=")
        try:
            target, pattern = float(value), re.compile(regex)
        except (ValueError, re.error):
            target = pattern = None
        if not regex or pattern is None or not 0.0 <= target < 1.0:
            raise CompressionOptionError(f"--sparsity-override {item!r}: expected REGEX=S with 0 <= S < 1")
        pairs.append((pattern, target))
    return pairs


def _weight_kind(module_name: str, module: nn.Module) -> Optional[str]:
    """``linear``, ``embedding`` or ``output`` for the modules whose weight may be compressed."""
    if isinstance(module, nn.Linear):
        return "output" if module_name.rsplit(".", 1)[-1] in OUTPUT_PROJECTIONS else "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None


def candidate_weights(model: nn.Module) -> List[Tuple[str, FrozenSet[str], nn.Parameter]]:
    """(first parameter name, kinds, parameter) of every compressible weight, each parameter once; a tied
    weight has the kinds of all modules that hold it."""
    found: Dict[int, Tuple[str, FrozenSet[str], nn.Parameter]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        kind = _weight_kind(module_name, module)
        weight = getattr(module, "weight", None) if kind else None
        if isinstance(weight, nn.Parameter) and weight.dim() == 2:
            name, kinds, _ = found.get(id(weight), (f"{module_name}.weight", frozenset(), weight))
            found[id(weight)] = (name, kinds | {kind}, weight)
    return list(found.values())


def select_weights(model: nn.Module, cfg: Any, with_overrides: bool) -> List[ScopedWeight]:
    """The weights in scope for ``cfg`` (see the module docstring). ``with_overrides``: apply
    ``--sparsity-override`` (the ADMM scope ignores it). A regex matching no weight is an error."""
    included = {"linear", *(("embedding",) if cfg.compress_embeddings else ()),
                *(("output",) if cfg.compress_output_projection else ())}
    overrides = parse_overrides(cfg.sparsity_override) if with_overrides else []
    candidates = candidate_weights(model)
    for pattern, _ in overrides:
        if not any(pattern.search(name) for name, _, _ in candidates):
            raise CompressionOptionError(
                f"--sparsity-override: {pattern.pattern!r} matches no compressible weight of "
                f"{type(model).__name__}; they are named like {', '.join(name for name, _, _ in candidates[:3])}"
            )
    selected = []
    for name, kinds, parameter in candidates:
        override = next((target for pattern, target in overrides if pattern.search(name)), None)
        if override == 0.0 or (override is None and not kinds & included):
            continue
        selected.append(ScopedWeight(name, parameter, override))
    if not selected:
        raise CompressionOptionError(f"no weight of {type(model).__name__} is in the compression scope")
    return selected
