"""Every option of the accel tasks acts or is rejected: none is accepted and silently ignored.

The walk iterates the fields of ``AccelGenerationConfig``, so an option added later is covered without
editing this file: each non-default value, in each context, must change what is built or decoded, or be
refused with ``AccelGenerationError`` (``CudaKernelsUnavailable`` for CUDA requested on a CPU machine).

The same for the options the plugin's models and its ``joint_ctc_attention`` criterion add to their stock
fairseq base (found by diffing ``add_args`` against the base's): each non-default value, parsed as
fairseq-train parses it, must change the built model (state-dict shapes, or the output on a fixed batch
in eval mode or, for dropouts, in train mode under a fixed seed) or the loss and logged validation
counts, or be refused with one ValueError line naming the option.
"""
import argparse
import dataclasses
import math
from typing import Dict, List, Optional, Sequence, Set, Tuple

import pytest
import torch
from fairseq import criterions, options, search
from fairseq.criterions import CRITERION_REGISTRY
from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_REGISTRY
from fairseq.sequence_generator import SequenceGenerator

import fairseq_accel.plugin  # noqa: F401  (registers the plugin, installs its fairseq patches)
from model_builders import SPEECH_TASK_ARGS, DictionaryTask, build_translation_model, random_tokens, toy_dictionary
from fairseq_accel.inference import cuda_kernels
from fairseq_accel.tasks.accel_generation import (
    AccelGenerationConfig,
    AccelGenerationError,
    build_accel_generator,
    build_task_generator,
)

# the settings in which a user passes an option (beyond the defaults)
CONTEXTS: Dict[str, dict] = {
    "stock": {},
    "fast": {"accel_generator": "fast"},
    "fast int8": {"accel_generator": "fast", "kv_cache_dtype": "int8"},
}
# (option, value, context) that cannot change anything there by design; each acts in
# test_guard_and_backend_options_act_where_they_apply instead.
NO_EFFECT_BY_DESIGN = {
    ("no_accel_fallback", True, "fast"): "a guard: the fast generator is used, nothing falls back",
    ("no_accel_fallback", True, "fast int8"): "a guard: the fast generator is used, nothing falls back",
    ("accel_threads", "torch", "fast"): "a thread count: the same results (and the tests run 1 thread)",
    ("accel_threads", "2", "fast"): "a thread count: the same results",
    ("accel_threads", "torch", "fast int8"): "a thread count: the same results (and the tests run 1 thread)",
    ("accel_threads", "2", "fast int8"): "a thread count: the same results",
    ("accel_parallel", "operations", "fast"): "how threads share a batch: the same results (test_fast_generator.py)",
    ("accel_parallel", "operations", "fast int8"): "how threads share a batch: the same results",
}
STRING_VALUES = {"accel_threads": ["auto", "torch", "2"]}  # options that take text, and the values walked
REJECTED = (AccelGenerationError, cuda_kernels.CudaKernelsUnavailable)


def option_values(option: dataclasses.Field) -> List:
    """Every value the command line accepts for ``option``: its choices, both booleans, or for a number its
    default and 0."""
    if option.type is bool:
        return [False, True]
    if option.type is int:
        return [option.default, 0]
    if option.type is str:
        return STRING_VALUES[option.name]
    choices = getattr(option.type, "__members__", None)
    assert choices, f"{option.name}: the walk knows booleans and choices only; teach it {option.type}"
    return [member.value for member in option.type]


def generation_options() -> List[dataclasses.Field]:
    """The command-line options of ``AccelGenerationConfig`` (``_name`` is fairseq's bookkeeping)."""
    options = [f for f in dataclasses.fields(AccelGenerationConfig) if not f.name.startswith("_")]
    assert len(options) >= 6
    return options


@pytest.fixture(scope="module")
def model_and_sample():
    dictionary = toy_dictionary(30)
    model = build_translation_model("transformer", dictionary, encoder_layers=1, decoder_layers=2,
                                    encoder_embed_dim=32, decoder_embed_dim=32, encoder_attention_heads=4,
                                    decoder_attention_heads=4, encoder_ffn_embed_dim=64, decoder_ffn_embed_dim=64)
    src = random_tokens(dictionary, 3, 7, torch.Generator().manual_seed(1))
    src[:, -1] = dictionary.eos()
    sample = {"net_input": {"src_tokens": src, "src_lengths": torch.full((3,), 7)}}
    return model, dictionary, sample


def outcome(settings: dict, model, dictionary, sample) -> Tuple:
    """What ``settings`` build and decode: ("rejected", error type), or (generator class, kernels,
    cache bytes per sentence, every hypothesis' tokens and positional scores)."""
    stock = SequenceGenerator([model], dictionary, beam_size=3, max_len_b=8)
    try:
        generator = build_task_generator([model], AccelGenerationConfig(**settings), dictionary, lambda: stock)
    except REJECTED as error:
        return "rejected", type(error).__name__
    with torch.no_grad():
        hypotheses = generator.generate([model], sample)
    decoded = tuple((tuple(h["tokens"].tolist()), tuple(h["positional_scores"].tolist())) for hs in hypotheses for h in hs)
    stats = getattr(generator, "cache_stats", None)
    return type(generator).__name__, getattr(generator, "kernels", None), stats and stats.per_sentence(), decoded


def test_every_generation_option_acts_or_is_rejected(model_and_sample) -> None:
    """(The compressed-checkpoint options are refused here, on a float model; they act in
    tests/test_compressed_checkpoint.py.)"""
    unused = dict(NO_EFFECT_BY_DESIGN)
    ignored = []
    for context_name, context in CONTEXTS.items():
        baseline = outcome(context, *model_and_sample)
        assert baseline[0] != "rejected", (context_name, baseline)
        for option in generation_options():
            current = context.get(option.name, option.default)
            for value in option_values(option):
                if value == current:
                    continue
                result = outcome({**context, option.name: value}, *model_and_sample)
                key = (option.name, value, context_name)
                if key in NO_EFFECT_BY_DESIGN:
                    assert result == baseline, (key, "expected no effect, got", result)
                    unused.pop(key)
                elif result == baseline:
                    ignored.append(key)
    assert not ignored, f"accepted and ignored: {ignored}"
    assert not unused, unused


def test_guard_and_backend_options_act_where_they_apply(model_and_sample, monkeypatch) -> None:
    """The options NO_EFFECT_BY_DESIGN exempts: --no-accel-fallback stops a fallback; --accel-kernels
    torch keeps the torch path where auto would take the CUDA kernels; --accel-parallel operations decodes a batch
    without sentence shards."""
    model, dictionary, _ = model_and_sample
    sampling = SequenceGenerator([model], dictionary, beam_size=1, search_strategy=search.Sampling(dictionary))
    fast = {"accel_generator": "fast"}
    assert build_accel_generator(sampling, [model], AccelGenerationConfig(**fast)) is sampling
    with pytest.raises(AccelGenerationError, match="Sampling.*--no-accel-fallback"):
        build_accel_generator(sampling, [model], AccelGenerationConfig(**fast, no_accel_fallback=True))

    monkeypatch.setattr(cuda_kernels, "cuda_kernels_available", lambda device=None: True)
    stock = SequenceGenerator([model], dictionary, beam_size=2)
    assert build_accel_generator(stock, [model], AccelGenerationConfig(**fast)).kernels is cuda_kernels
    assert build_accel_generator(stock, [model], AccelGenerationConfig(**fast, accel_kernels="torch")).kernels is None
    # --accel-parallel operations: no sentence shards (that both decode what stock does: test_fast_generator.py)
    assert build_accel_generator(stock, [model], AccelGenerationConfig(**fast)).sentence_parallel is not None
    assert build_accel_generator(stock, [model], AccelGenerationConfig(**fast, accel_parallel="operations")
                                 ).sentence_parallel is None


@pytest.mark.parametrize("settings,message", [
    ({"key_scale": "channel"}, "--key-scale apply to the fast generator"),
    ({"no_accel_fallback": True}, "--no-accel-fallback apply to the fast generator"),
    ({"accel_parallel": "operations"}, "--accel-parallel apply to the fast generator"),
    ({"accel_generator": "fast", "quantize_cross_kv": True}, "--quantize-cross-kv apply to a quantized cache"),
    ({"accel_generator": "fast", "key_scale": "channel"}, "--key-scale channel apply to a quantized cache"),
    ({"accel_generator": "fast", "kv_cache_dtype": "fp16", "key_scale": "channel"}, "use --kv-cache-dtype int8"),
])
def test_ignored_options_are_one_line_errors(model_and_sample, settings: dict, message: str) -> None:
    model, dictionary, _ = model_and_sample
    stock = SequenceGenerator([model], dictionary, beam_size=2)
    with pytest.raises(AccelGenerationError, match=message) as error:
        build_accel_generator(stock, [model], AccelGenerationConfig(**settings))
    assert "\n" not in str(error.value)


# --------------------------------------------------------------------------------------------
# The options the plugin's models and criterion add to fairseq's.
# --------------------------------------------------------------------------------------------
DICTIONARY = toy_dictionary(30)
# Each plugin model at a small size (seconds for the whole walk); the sizes are stock options.
SMALL_SPEECH = ["--encoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64", "--encoder-attention-heads", "2",
                "--encoder-layers", "2", "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64",
                "--decoder-attention-heads", "2", "--decoder-layers", "1"]
PLUGIN_MODELS: Dict[str, Tuple[str, str, List[str]]] = {  # model: (arch, task, size options)
    "lite_transformer": ("lite_transformer_mini", "translation", [
        "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
        "--decoder-attention-heads", "2", "--encoder-layers", "2", "--decoder-layers", "2"]),
    "s2t_sanm": ("s2t_sanm_mini", "speech_to_text", SMALL_SPEECH),
    "s2t_lite_transformer": ("s2t_lite_transformer_s", "speech_to_text", SMALL_SPEECH),
}
# A non-default valid value for each option that is neither a boolean nor a choice (those walk every value).
WALK_VALUES: Dict[str, List[str]] = {
    "encoder_branch_type": ["attn:1:16:2", "dynamic:default:16:2"],
    "decoder_branch_type": ["attn:1:16:2", "dynamic:default:16:2"],
    "encoder_kernel_size_list": ["5", "9"],
    "decoder_kernel_size_list": ["5", "9"],
    "weight_dropout": ["0.3"],
    "lfr_m": ["5"],
    "lfr_n": ["3"],
    "sanm_kernel_size": ["5"],
    "sanm_shift": ["2"],
    "sanm_shfit": ["2"],
    "decoder_kernel_size": ["3"],
    "ctc_weight": ["0.6"],
    "post_process": ["letter"],
    "conv_kernel_sizes": ["3,3"],
    "conv_channels": ["16"],
    "conv_out_channels": ["12"],
    "encoder_freezing_updates": ["10"],
    "encoder_share_layers": ["2"],
    "decoder_share_layers": ["2"],
    "encoder_share_map": ["0,0"],
    "decoder_share_map": ["0,0"],
}
# Options also walked in another setting (where they must equally act or be rejected): the one where they
# act (LFR sizes), or where they would have nothing to act on (FSMN kernel with the transformer decoder).
OTHER_CONTEXTS: Dict[str, List[str]] = {
    "lfr_m": ["--input-layer", "lfr"],
    "lfr_n": ["--input-layer", "lfr"],
    "decoder_kernel_size": ["--decoder-type", "transformer"],
}


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: tiny ops with 2 OpenMP threads on a loaded 2-core machine are many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def stock_base(plugin_class: type) -> type:
    """The nearest fairseq class the plugin's model or criterion extends."""
    return next(base for base in plugin_class.__mro__[1:] if not base.__module__.startswith("fairseq_accel"))


def added_options(plugin_class: type, base: Optional[type] = None) -> List[argparse.Action]:
    """The options ``plugin_class.add_args`` adds to those of ``base`` (default: its stock base), so new
    ones are walked too; ``base=argparse.Namespace`` (no options) gives all of them."""
    def actions(owner: type) -> List[argparse.Action]:
        parser = argparse.ArgumentParser(argument_default=argparse.SUPPRESS, add_help=False)
        if hasattr(owner, "add_args"):
            owner.add_args(parser)
        return parser._actions

    stock = {name for action in actions(base or stock_base(plugin_class)) for name in action.option_strings}
    return [action for action in actions(plugin_class) if not stock.intersection(action.option_strings)]


def walk_values(action: argparse.Action, baseline) -> List[List[str]]:
    """The command-line values to try for ``action``, each different from its value in ``baseline``
    (none for a flag that is on by default: see ``flag_off``)."""
    current = getattr(baseline, action.dest, None)
    if isinstance(action, argparse._StoreTrueAction):
        return [] if current else [[]]
    if action.choices:
        values = [[choice] for choice in action.choices if choice != current]
    elif isinstance(current, bool):
        values = [[str(not current)]]
    else:
        assert action.dest in WALK_VALUES, f"{action.option_strings[0]}: teach the walk a value (WALK_VALUES)"
        values = [WALK_VALUES[action.dest]]
    assert values, f"{action.option_strings[0]}: no value besides {current!r} to try"
    return values


def parse_plugin_args(model: str, options_given: Sequence[str], criterion: str = "cross_entropy") -> argparse.Namespace:
    """``options_given`` parsed as fairseq-train parses them (model, task and criterion options, arch
    defaults), plus what the speech_to_text task adds from its data config."""
    arch, task, sizes = PLUGIN_MODELS[model]
    parser = options.get_training_parser(default_task=task)
    argv = ["data-bin", "--task", task, "--arch", arch, "--criterion", criterion, *sizes, *options_given]
    args = options.parse_args_and_arch(parser, argv)
    if task == "speech_to_text":
        vars(args).update(SPEECH_TASK_ARGS)
    return args


def build_plugin_model(args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(0)
    return ARCH_MODEL_REGISTRY[args.arch].build_model(args, DictionaryTask(DICTIONARY))


def fixed_batch(task: str) -> dict:
    """A fixed net_input for ``task``: two sentences of tokens, or two utterances of 80-dim filterbanks."""
    generator = torch.Generator().manual_seed(2)
    prev_output_tokens = random_tokens(DICTIONARY, 2, 5, generator)
    if task == "translation":
        return {"src_tokens": random_tokens(DICTIONARY, 2, 7, generator), "src_lengths": torch.tensor([7, 7]),
                "prev_output_tokens": prev_output_tokens}
    return {"src_tokens": torch.randn(2, 48, 80, generator=generator), "src_lengths": torch.tensor([48, 40]),
            "prev_output_tokens": prev_output_tokens}


def model_outcome(model_name: str, options_given: Sequence[str], overrides: Optional[dict] = None) -> Tuple:
    """What ``options_given`` build: ("rejected", message), or (state-dict shapes, the decoder output on
    a fixed batch in eval mode, and in train mode under a fixed seed, which dropouts change, and whether
    the encoder output carries gradients in training, which encoder freezing changes).

    The config is then put through the architecture function once more, as loading a checkpoint does
    (with ``overrides``, as ``--model-overrides`` gives them): a saved config must load unchanged."""
    try:
        args = parse_plugin_args(model_name, options_given)
        vars(args).update(overrides or {})
        ARCH_CONFIG_REGISTRY[args.arch](args)
        model = build_plugin_model(args)
    except ValueError as error:
        return "rejected", str(error)
    batch = fixed_batch(PLUGIN_MODELS[model_name][1])
    shapes = tuple((name, tuple(value.shape)) for name, value in model.state_dict().items())
    with torch.no_grad():
        evaluated = model.eval()(**batch)[0]
        torch.manual_seed(1)
        trained = model.train()(**batch)[0]
    encoder_learns = model.encoder(batch["src_tokens"], batch["src_lengths"])["encoder_out"][0].requires_grad
    return shapes, evaluated, trained, encoder_learns


def same_outcome(first: Tuple, second: Tuple) -> bool:
    """Equal outcomes: equal strings and shapes, tensors equal up to float rounding."""
    if len(first) != len(second):
        return False
    for a, b in zip(first, second):
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-5, atol=1e-6):
                return False
        elif isinstance(a, float) and isinstance(b, float):
            if not math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9):
                return False
        elif a != b:
            return False
    return True


# The LSRA convolution options and the sides whose branches they shape: with attention-only branches
# there (all 32 model channels to attention) they have nothing to act on, nor has a kernel-size list
# where every convolution branch gives its own kernel.
CONVOLUTION_OPTIONS: Dict[str, Tuple[str, ...]] = {
    "encoder_glu": ("encoder",), "encoder_kernel_size_list": ("encoder",),
    "decoder_glu": ("decoder",), "decoder_kernel_size_list": ("decoder",),
    "weight_softmax": ("encoder", "decoder"), "weight_dropout": ("encoder", "decoder"),
}
ATTENTION_ONLY = ["attn:1:32:2"]
EXPLICIT_KERNELS = ["attn:1:16:2", "lightweight:5:16:2"]


def on_sides(branches: List[str], option: str, options_of_model: Set[str]) -> List[str]:
    """``branches`` as the branch types of every side of the model that ``option`` shapes."""
    sides = [side for side in CONVOLUTION_OPTIONS[option] if f"{side}_branch_type" in options_of_model]
    return [argument for side in sides for argument in (f"--{side}-branch-type", *branches)]


def convolution_contexts(option: str, options_of_model: Set[str]) -> List[List[str]]:
    """The settings where LSRA convolution ``option`` has nothing to act on."""
    if option not in CONVOLUTION_OPTIONS:
        return []
    contexts = [on_sides(ATTENTION_ONLY, option, options_of_model)]
    if option.endswith("kernel_size_list"):
        contexts.append(on_sides(EXPLICIT_KERNELS, option, options_of_model))
    return contexts


def model_option_case(model_name: str, action: argparse.Action, context: Sequence[str]):
    label = f"{model_name}-{action.option_strings[0]}{''.join(' ' + c for c in context)}"
    return pytest.param(model_name, action, tuple(context), id=label)


def plugin_model_options() -> List:
    """(model, option, context) for every option each plugin model adds, in each context it is walked in."""
    cases = []
    for model_name, (arch, _, _) in PLUGIN_MODELS.items():
        actions = added_options(ARCH_MODEL_REGISTRY[arch])
        dests = {action.dest for action in actions}
        for action in actions:
            contexts = [[], OTHER_CONTEXTS.get(action.dest), *convolution_contexts(action.dest, dests)]
            cases.extend(model_option_case(model_name, action, context) for context in contexts if context is not None)
    return cases


# The stock s2t_transformer options that the plugin's speech encoders and the FSMN decoder build
# differently from fairseq, each with the settings (beyond the defaults) to walk it in: the LFR
# front-end (no convolutions) and, for the decoder options, fairseq's transformer decoder.
LFR = ["--input-layer", "lfr"]
TRANSFORMER_DECODER = ["--decoder-type", "transformer"]
STOCK_SPEECH_OPTIONS: Dict[str, List[List[str]]] = {
    "conv_kernel_sizes": [[], LFR], "conv_channels": [[], LFR], "conv_version": [[], LFR],
    "conv_out_channels": [[], LFR], "activation_fn": [[]], "encoder_freezing_updates": [[]],
    "no_scale_embedding": [[]], "encoder_normalize_before": [[]],
    "decoder_normalize_before": [[], TRANSFORMER_DECODER], "layernorm_embedding": [[], TRANSFORMER_DECODER],
}


def stock_speech_options() -> List:
    """(model, stock option, context) for the options of STOCK_SPEECH_OPTIONS on each speech model."""
    cases = []
    for model_name, (arch, task, _) in PLUGIN_MODELS.items():
        if task != "speech_to_text":
            continue
        model_class = ARCH_MODEL_REGISTRY[arch]
        plugin_dests = {action.dest for action in added_options(model_class)}
        stock_actions = {action.dest: action for action in added_options(stock_base(model_class), base=argparse.Namespace)}
        for dest, contexts in STOCK_SPEECH_OPTIONS.items():
            for context in contexts:
                if all(option[2:].replace("-", "_") in plugin_dests for option in context[::2]):
                    cases.append(model_option_case(model_name, stock_actions[dest], context))
    return cases


def assert_acts_or_is_rejected(action: argparse.Action, value: List[str], result: Tuple, baseline: Tuple, where: str) -> None:
    option = action.option_strings[0]
    if result[0] == "rejected":
        assert "\n" not in result[1] and option in result[1], f"{option} {value}: rejected unclearly: {result[1]!r}"
    else:
        assert not same_outcome(result, baseline), f"{option} {' '.join(value)} is accepted and ignored by {where}"


def flag_off(action: argparse.Action, defaults) -> Optional[dict]:
    """For a flag that is on by default (no command line turns it off): the override that does, as
    ``--model-overrides`` or an edited saved config would give it."""
    if isinstance(action, argparse._StoreTrueAction) and getattr(defaults, action.dest, False):
        return {action.dest: False}
    return None


@pytest.mark.parametrize("model_name,action,context", plugin_model_options() + stock_speech_options())
def test_every_model_option_acts_or_is_rejected(model_name: str, action: argparse.Action, context: Tuple[str, ...]) -> None:
    baseline = model_outcome(model_name, context)
    assert baseline[0] != "rejected", baseline
    where = f"{model_name} with {' '.join(context)}" if context else model_name
    defaults = parse_plugin_args(model_name, context)
    override = flag_off(action, defaults)
    if override:
        assert_acts_or_is_rejected(action, ["False"], model_outcome(model_name, context, override), baseline, where)
    for value in walk_values(action, defaults):
        result = model_outcome(model_name, [*context, action.option_strings[0], *value])
        assert_acts_or_is_rejected(action, value, result, baseline, where)


def criterion_outcome(options_given: Sequence[str]) -> Tuple:
    """What ``options_given`` compute with joint_ctc_attention on s2t_sanm for a fixed batch in eval
    mode (where validation adds the CTC error counts): ("rejected", message), or (loss, logging output).
    The second utterance has more labels than its 10 encoder frames, so CTC is infinite for it."""
    try:
        args = parse_plugin_args("s2t_sanm", options_given, criterion="joint_ctc_attention")
        model = build_plugin_model(args).eval()
        criterion = criterions.build_criterion(args, DictionaryTask(DICTIONARY))
    except ValueError as error:
        return "rejected", str(error)
    generator = torch.Generator().manual_seed(3)
    target = random_tokens(DICTIONARY, 2, 14, generator)
    target[0, 4:] = DICTIONARY.pad()
    target[0, 3] = target[1, 13] = DICTIONARY.eos()
    net_input = {**fixed_batch("speech_to_text"), "prev_output_tokens": torch.roll(target, 1, dims=1)}
    sample = {"net_input": net_input, "target": target, "ntokens": int(target.ne(DICTIONARY.pad()).sum())}
    with torch.no_grad():
        loss, _, logging_output = criterion(model, sample)
    return (float(loss), *sorted((key, float(value)) for key, value in logging_output.items()))


def test_every_criterion_option_acts_or_is_rejected() -> None:
    actions = added_options(CRITERION_REGISTRY["joint_ctc_attention"])
    assert {"ctc_weight", "ctc_zero_infinity"} <= {action.dest for action in actions}
    baseline = criterion_outcome([])
    assert baseline[0] != "rejected", baseline
    defaults = parse_plugin_args("s2t_sanm", [], criterion="joint_ctc_attention")
    for action in actions:
        for value in walk_values(action, defaults):
            result = criterion_outcome([action.option_strings[0], *value])
            assert_acts_or_is_rejected(action, value, result, baseline, "joint_ctc_attention")


def test_the_walk_finds_the_options_of_each_plugin_model() -> None:
    found = {name: {action.dest for action in added_options(ARCH_MODEL_REGISTRY[arch])}
             for name, (arch, _, _) in PLUGIN_MODELS.items()}
    assert {"encoder_branch_type", "decoder_glu", "weight_dropout"} <= found["lite_transformer"]
    assert {"sanm_kernel_size", "sanm_shift", "decoder_type", "lfr_m"} <= found["s2t_sanm"]
    assert {"encoder_branch_type", "input_layer"} <= found["s2t_lite_transformer"]
    assert not found["lite_transformer"] & {"encoder_embed_dim", "dropout"}  # stock options are not "added"


SPEECH_MODELS = [name for name, (_, task, _) in PLUGIN_MODELS.items() if task == "speech_to_text"]


@pytest.mark.parametrize("model_name", SPEECH_MODELS)
def test_encoder_freezing_ends_after_the_given_updates(model_name: str) -> None:
    model = build_plugin_model(parse_plugin_args(model_name, ["--encoder-freezing-updates", "3"])).train()
    batch = fixed_batch("speech_to_text")
    for updates, learns in [(0, False), (2, False), (3, True)]:
        model.set_num_updates(updates)
        assert model.encoder(batch["src_tokens"], batch["src_lengths"])["encoder_out"][0].requires_grad == learns


def save_checkpoint(model: torch.nn.Module, path) -> None:
    """A minimal fairseq checkpoint of ``model``'s weights (what ``load_checkpoint_to_cpu`` reads)."""
    history = [{"criterion_name": "CrossEntropyCriterion", "optimizer_name": "Adam",
                "lr_scheduler_state": {"best": None}, "num_updates": 0}]
    torch.save({"model": model.state_dict(), "optimizer_history": history, "extra_state": {}, "args": None,
                "cfg": None, "last_optimizer_state": None}, path)


@pytest.mark.parametrize("model_name", SPEECH_MODELS)
def test_load_pretrained_encoder_from_initialises_the_encoder(model_name: str, tmp_path) -> None:
    pretrained = build_plugin_model(parse_plugin_args(model_name, []))
    with torch.no_grad():
        for weight in pretrained.parameters():
            weight.add_(torch.rand_like(weight))
    save_checkpoint(pretrained, tmp_path / "pretrained.pt")
    fresh = build_plugin_model(parse_plugin_args(model_name, []))
    model = build_plugin_model(parse_plugin_args(model_name, ["--load-pretrained-encoder-from", str(tmp_path / "pretrained.pt")]))
    for name, weight in model.state_dict().items():
        expected = (pretrained if name.startswith("encoder.") else fresh).state_dict()[name]
        assert torch.equal(weight, expected), name


def test_load_pretrained_encoder_from_a_missing_file_is_logged(tmp_path, caplog) -> None:
    """As fairseq's s2t_transformer: a checkpoint trained from a pretrained encoder must load where that
    file is not, so a missing file is a warning naming it, and the encoder starts from scratch."""
    missing = str(tmp_path / "missing.pt")
    model = build_plugin_model(parse_plugin_args("s2t_sanm", ["--load-pretrained-encoder-from", missing]))
    fresh = build_plugin_model(parse_plugin_args("s2t_sanm", []))
    assert all(torch.equal(weight, fresh.state_dict()[name]) for name, weight in model.state_dict().items())
    assert any(missing in record.getMessage() and record.levelname == "WARNING" for record in caplog.records)


@pytest.mark.parametrize("model_name,options_given,message", [
    ("lite_transformer", ["--encoder-branch-type", "attn:1:32:2", "--encoder-glu", "True"],
     "--encoder-glu True applies to convolution branches; --encoder-branch-type attn:1:32:2 has none"),
    ("lite_transformer", ["--decoder-branch-type", *EXPLICIT_KERNELS, "--decoder-kernel-size-list", "5", "9"],
     "--decoder-kernel-size-list 5 9 applies to convolution branches of kernel 'default'"),
    ("s2t_lite_transformer", ["--encoder-branch-type", "attn:1:32:2", "--weight-dropout", "0.3"],
     "--weight-dropout 0.3 applies to convolution branches; --encoder-branch-type has none"),
    ("s2t_sanm", [*LFR, "--conv-out-channels", "12"], "--conv-out-channels 12 applies to --input-layer conv2d only"),
    ("lite_transformer", ["--encoder-attention-heads", "2"], "--encoder-attention-heads 2 has no effect"),
    ("s2t_sanm", ["--conv-version", "convtransformer"], "--conv-version convtransformer configures fairseq's subsampler"),
])
def test_ignored_model_options_are_one_line_errors(model_name: str, options_given: List[str], message: str) -> None:
    outcome = model_outcome(model_name, options_given)
    assert outcome[0] == "rejected" and outcome[1].startswith(message) and "\n" not in outcome[1], outcome


@pytest.mark.parametrize("model_name,overrides", [
    ("lite_transformer", {"encoder_branch_type": ["attn:1:32:2"], "decoder_branch_type": ["attn:1:32:2"]}),
    ("s2t_sanm", {"input_layer": "lfr"}),
    ("s2t_lite_transformer", {"input_layer": "lfr", "encoder_branch_type": ["attn:1:32:2"]}),
])
def test_saved_configs_with_the_defaults_still_load(model_name: str, overrides: dict) -> None:
    """fairseq re-runs the architecture function on a checkpoint's saved config, which holds every default,
    also those of options the layout ignores: they are accepted there."""
    saved = parse_plugin_args(model_name, [])  # every default filled in, as training saved it
    vars(saved).update(overrides)
    ARCH_CONFIG_REGISTRY[saved.arch](saved)  # what loading the checkpoint does
    build_plugin_model(saved)
