"""Compression fine-tuning on every model of the plugin and the stock transformers (in process, synthetic
gradients): the default scope, the opt-in embeddings/output projections, and every --sparsity-*, --compress-*,
--admm-* option acting or being refused (none accepted and ignored)."""
import dataclasses
from typing import Callable, Dict, List, Tuple

import pytest
import torch
from torch import nn

from model_builders import build_speech_model, build_translation_model
from fairseq_accel.compression.config import CompressionTrainingConfig, check_compression_options
from fairseq_accel.compression.errors import CompressionOptionError
from fairseq_accel.compression.fine_tuning import CompressionFineTuning

MODELS: Dict[str, Callable[[], nn.Module]] = {
    "transformer": lambda: build_translation_model(
        "transformer", encoder_layers=1, decoder_layers=1, encoder_embed_dim=16, decoder_embed_dim=16,
        encoder_ffn_embed_dim=32, decoder_ffn_embed_dim=32, encoder_attention_heads=2, decoder_attention_heads=2),
    "lite_transformer": lambda: build_translation_model("lite_transformer_mini", encoder_layers=1, decoder_layers=1),
    "s2t_transformer": lambda: build_speech_model("s2t_transformer_xs", encoder_layers=1, decoder_layers=1),
    "s2t_sanm": lambda: build_speech_model("s2t_sanm_mini", encoder_layers=1, decoder_layers=1, ctc_weight=0.3),
    "s2t_lite_transformer": lambda: build_speech_model("s2t_lite_transformer_s", encoder_layers=1, decoder_layers=1),
}
PRUNE = dict(sparsity_target=0.5, sparsity_end_update=4, sparsity_frequency=2)


def fine_tune(model: nn.Module, updates: int = 4, **options) -> CompressionFineTuning:
    """``updates`` SGD steps on the synthetic loss sum(w * r) + |w|^2 / 2 (r fixed per parameter)."""
    cfg = CompressionTrainingConfig(**options)
    check_compression_options(cfg)
    tuning = CompressionFineTuning(model, cfg)
    generator = torch.Generator().manual_seed(0)
    pulls = [torch.randn(p.shape, generator=generator) for p in model.parameters()]
    for update in range(1, updates + 1):
        for parameter, pull in zip(model.parameters(), pulls):
            parameter.grad = pull + parameter.detach()
        tuning.before_step(update)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter -= 0.05 * parameter.grad
        tuning.after_step(update)
    return tuning


def linear_weights(model: nn.Module) -> Dict[str, Tuple[str, torch.Tensor]]:
    """name -> (kind, weight) of every distinct nn.Linear / nn.Embedding weight."""
    found, seen = {}, set()
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            leaf = name.rsplit(".", 1)[-1]
            kind = "embedding" if isinstance(module, nn.Embedding) else (
                "output" if leaf in ("output_projection", "ctc_proj") else "linear")
            found[f"{name}.weight"] = (kind, module.weight)
    return found


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_default_scope_is_every_linear_and_opt_ins_add_the_rest(arch: str) -> None:
    model = MODELS[arch]()
    tuning = fine_tune(model, **PRUNE)
    weights = linear_weights(model)
    assert set(tuning.masks()) == {name for name, (kind, _) in weights.items() if kind == "linear"}
    for name, (kind, weight) in weights.items():
        sparsity = (weight == 0).float().mean().item()
        if kind == "linear":
            assert abs(sparsity - 0.5) <= 0.005, (name, sparsity)
        else:
            assert sparsity < 0.1, (name, sparsity)  # only padding rows may be zero
    everything = MODELS[arch]()
    masks = fine_tune(everything, **PRUNE, compress_embeddings=True, compress_output_projection=True).masks()
    assert set(masks) == set(linear_weights(everything))


#: A non-default value (or several) for every option of CompressionTrainingConfig.
NON_DEFAULT = {
    "sparsity_target": [0.3], "sparsity_schedule": ["linear"], "sparsity_start_update": [1],
    "sparsity_end_update": [3], "sparsity_frequency": [1], "sparsity_importance": ["taylor"],
    "sparsity_pattern": ["row", "2:4"], "sparsity_threshold": ["global"], "sparsity_override": [r"fc1=0.3"],
    "compress_embeddings": [True], "compress_output_projection": [True], "admm_bits": [4], "admm_rho": [0.5],
    "admm_start_update": [2], "admm_update_frequency": [1], "admm_finalize_update": [3],
}
CONTEXTS = {"nothing": {}, "pruning": PRUNE, "admm": dict(admm_bits=8, admm_finalize_update=4)}


def outcome(options: dict) -> object:
    """The weights after a short fine-tune under ``options``, or the refusal."""
    model = MODELS["transformer"]()
    try:
        fine_tune(model, **options)
    except CompressionOptionError:
        return "refused"
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def same(a: object, b: object) -> bool:
    return a == b if isinstance(a, str) or isinstance(b, str) else torch.equal(a, b)


@pytest.mark.parametrize("context", sorted(CONTEXTS))
def test_every_compression_option_acts_or_is_refused(context: str) -> None:
    fields = {f.name for f in dataclasses.fields(CompressionTrainingConfig) if not f.name.startswith("_")}
    assert set(NON_DEFAULT) == fields, "teach this walk the new option's values"
    base = CONTEXTS[context]
    reference = outcome(base)
    ignored: List[str] = []
    for name, values in NON_DEFAULT.items():
        for value in values:
            if base.get(name) == value:
                continue
            result = outcome({**base, name: value})
            if result != "refused" and same(result, reference):
                ignored.append(f"{name}={value}")
    assert not ignored, f"accepted and ignored with {context}: {ignored}"


def test_the_walk_can_fail() -> None:
    """Control: a value that really changes nothing (the default itself) is found to be ignored."""
    assert same(outcome({**PRUNE, "sparsity_schedule": "cubic"}), outcome(PRUNE))
