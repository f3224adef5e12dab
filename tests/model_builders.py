"""Build small plugin models directly (no CLI) for unit tests."""
import argparse
from typing import Optional

import torch
from fairseq.data import Dictionary
from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_REGISTRY
import fairseq_accel.plugin  # noqa: F401  (registers the plugin, installs its fairseq patches)


class DictionaryTask:
    """The two attributes a fairseq translation model's ``build_model`` reads from its task."""

    def __init__(self, dictionary: Dictionary):
        self.source_dictionary = dictionary
        self.target_dictionary = dictionary


def toy_dictionary(num_words: int = 40) -> Dictionary:
    dictionary = Dictionary()
    for index in range(num_words):
        dictionary.add_symbol(f"w{index}")
    return dictionary


# What fairseq's speech_to_text task adds to the model args from its data config and options.
SPEECH_TASK_ARGS = dict(input_feat_per_channel=80, input_channels=1, max_source_positions=6000)


def build_speech_model(arch: str, dictionary: Optional[Dictionary] = None, seed: int = 0, **overrides):
    """Build a speech_to_text model for 80-dim filterbanks (see :func:`build_translation_model`)."""
    return build_translation_model(arch, dictionary, seed, **{**SPEECH_TASK_ARGS, **overrides})


def build_translation_model(arch: str, dictionary: Optional[Dictionary] = None, seed: int = 0, **overrides):
    """Build ``arch`` the way fairseq-train does: explicit CLI defaults, overrides, arch defaults; eval mode."""
    dictionary = dictionary or toy_dictionary()
    model_class = ARCH_MODEL_REGISTRY[arch]
    parser = argparse.ArgumentParser(argument_default=argparse.SUPPRESS)
    model_class.add_args(parser)
    args = parser.parse_args([])
    vars(args).update(overrides)
    ARCH_CONFIG_REGISTRY[arch](args)
    args.arch = arch
    args.max_source_positions = getattr(args, "max_source_positions", 256)
    args.max_target_positions = getattr(args, "max_target_positions", 256)
    torch.manual_seed(seed)
    model = model_class.build_model(args, DictionaryTask(dictionary))
    # fairseq initialises biases to zero, which hides padding leaks through a biased projection;
    # give every bias and layer-norm weight trained-looking values.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    return model.eval()


def random_tokens(dictionary: Dictionary, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """Tokens of real words (no special symbols), shape (batch, length)."""
    return torch.randint(dictionary.nspecial, len(dictionary), (batch, length), generator=generator)
