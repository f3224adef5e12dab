"""Cross-layer weight sharing (``--{encoder,decoder}-share-layers K``, ``--{encoder,decoder}-share-map``,
``--share-layer-norms``) on lite_transformer, s2t_sanm and s2t_lite_transformer.

Tied layers hold the same ``nn.Parameter`` objects; that is checked directly, and through what it must give:
gradients of all layers of a group summed into one weight, a fairseq-train checkpoint that stores each
shared weight once (its size is compared with an unshared run's), weights still tied after fairseq-train
updates and after fairseq-generate's loading, decoding with the fast generator identical to stock, and
fairseq-accel-profile counting shared weights once but every layer's Mult-Adds.
"""
import json
import logging
from pathlib import Path
from typing import Dict, List

import pytest
import torch
from fairseq import checkpoint_utils
from fairseq.sequence_generator import SequenceGenerator

from conftest import TINY_TRAIN, USER_DIR, cli_output, run_cli, tiny_lsra
import fairseq_accel.plugin  # noqa: F401  (registers the plugin, installs its fairseq patches)
from model_builders import build_speech_model, build_translation_model, random_tokens, toy_dictionary
from test_fast_generator import compare, fast_from, generate, outputs, speech_sample
from fairseq_accel.modules.layer_sharing import LayerSharingError

ERROR = "fairseq_accel.modules.layer_sharing.LayerSharingError: "
# The conftest LSRA model with equal kernels in each stack, so its two layers can share.
EQUAL_KERNELS = ["--encoder-kernel-size-list", "3", "3", "--decoder-kernel-size-list", "3", "3"]
SHARE_BOTH = ["--encoder-share-layers", "2", "--decoder-share-layers", "2"]
TINY_LSRA = dict(encoder_layers=2, decoder_layers=2, encoder_embed_dim=32, decoder_embed_dim=32,
                 decoder_attention_heads=2, encoder_kernel_size_list=[3, 3], decoder_kernel_size_list=[3, 3])
SMALL_SPEECH = dict(encoder_embed_dim=32, encoder_ffn_embed_dim=64, encoder_attention_heads=2, decoder_embed_dim=32,
                    decoder_ffn_embed_dim=64, decoder_attention_heads=2, encoder_layers=2, decoder_layers=2)


def is_norm(name: str) -> bool:
    """Layer-norm parameters, by the names the three models give them (fairseq's ``*layer_norm``, FunASR's
    ``norm1..3`` and the FFN's ``norm``)."""
    return any(part.endswith("layer_norm") or part.startswith("norm") for part in name.split("."))


def layer_keys(state: Dict[str, torch.Tensor], stack: str, layer: int) -> Dict[str, torch.Tensor]:
    """``{name inside the layer: tensor}`` of layer ``layer`` of ``stack`` (e.g. ``encoder.layers``)."""
    prefix = f"{stack}.{layer}."
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


def train(data: Path, save_dir: Path, *extra: str, updates: int) -> str:
    """fairseq-train the conftest LSRA model (equal kernels) into ``save_dir``; return its log."""
    result = run_cli(["fairseq-train", data, "--user-dir", USER_DIR, *tiny_lsra("dynamic"), *EQUAL_KERNELS,
                      *TINY_TRAIN, "--max-update", str(updates), "--no-save-optimizer-state", "--save-dir", save_dir,
                      *extra], timeout=900)
    assert result.returncode == 0, cli_output(result)
    return result.stdout + result.stderr  # fairseq logs to stdout


@pytest.fixture(scope="module")
def shared_checkpoint(tiny_translation_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A lite_transformer trained with both stacks' two layers sharing one set of weights."""
    save_dir = tmp_path_factory.mktemp("shared")
    train(tiny_translation_data, save_dir, *SHARE_BOTH, updates=200)
    return save_dir / "checkpoint_last.pt"


@pytest.fixture(scope="module")
def unshared_checkpoint(tiny_translation_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    save_dir = tmp_path_factory.mktemp("unshared")
    train(tiny_translation_data, save_dir, updates=2)
    return save_dir / "checkpoint_last.pt"


# ------------------------------------------------------------------------------------------------
# What is tied
# ------------------------------------------------------------------------------------------------
def stacks(model) -> Dict[str, List[torch.nn.Module]]:
    decoder = model.decoder
    return {"encoder": list(model.encoder.layers), "decoder": list(getattr(decoder, "decoders", None) or decoder.layers)}


@pytest.mark.parametrize("arch,builder,sizes", [
    ("lite_transformer_mini", build_translation_model, TINY_LSRA),
    ("s2t_sanm_mini", build_speech_model, SMALL_SPEECH),
    ("s2t_sanm_mini", build_speech_model, {**SMALL_SPEECH, "decoder_type": "transformer"}),
    ("s2t_lite_transformer_s", build_speech_model, {**SMALL_SPEECH, "encoder_kernel_size_list": [3, 3]}),
])
@pytest.mark.parametrize("share_layer_norms", [False, True])
def test_layers_of_a_group_hold_the_same_parameters(arch, builder, sizes, share_layer_norms: bool) -> None:
    model = builder(arch, encoder_share_layers=2, decoder_share_map="0,0", share_layer_norms=share_layer_norms, **sizes)
    unshared = builder(arch, **sizes)
    for side, (first, second) in stacks(model).items():
        names = dict(first.named_parameters())
        tied = [name for name, weight in second.named_parameters() if weight is names[name]]
        expected = [name for name, _ in second.named_parameters() if share_layer_norms or not is_norm(name)]
        assert tied == expected, side
        assert any(is_norm(name) for name in names) and len(tied) >= 6, side  # norms exist; tied is not trivial
    # each tied parameter is counted once: the model shrinks by exactly one layer per stack
    per_layer = {side: sum(w.numel() for n, w in layers[1].named_parameters() if share_layer_norms or not is_norm(n))
                 for side, layers in stacks(unshared).items()}
    assert sum(w.numel() for w in unshared.parameters()) - sum(w.numel() for w in model.parameters()) == sum(per_layer.values())


def test_gradients_of_every_layer_of_a_group_accumulate() -> None:
    """The shared weight's gradient is the sum of the gradients the two layers would get as copies."""
    dictionary = toy_dictionary()
    shared = build_translation_model("lite_transformer_mini", dictionary, **TINY_LSRA, encoder_share_layers=2,
                                     decoder_share_layers=2)
    copies = build_translation_model("lite_transformer_mini", dictionary, **TINY_LSRA)
    copies.load_state_dict(shared.state_dict())  # the same values, untied
    generator = torch.Generator().manual_seed(0)
    batch = {"src_tokens": random_tokens(dictionary, 2, 6, generator), "src_lengths": torch.tensor([6, 6]),
             "prev_output_tokens": random_tokens(dictionary, 2, 5, generator)}
    for model in (shared, copies):
        model(**batch)[0].logsumexp(-1).sum().backward()
    for stack in ("encoder.layers", "decoder.layers"):
        shared_grads = {n: w.grad for n, w in shared.get_submodule(stack)[0].named_parameters()}
        first, second = (dict(copies.get_submodule(stack)[i].named_parameters()) for i in (0, 1))
        for name, grad in shared_grads.items():
            expected = first[name].grad if is_norm(name) else first[name].grad + second[name].grad
            assert torch.allclose(grad, expected, atol=1e-6), (stack, name)
        assert not torch.allclose(first["fc1.weight"].grad, second["fc1.weight"].grad)  # two real contributions


def test_an_unshared_checkpoint_loads_into_groups_from_their_first_layer(caplog) -> None:
    """Fine-tuning an unshared model with sharing: each group starts from its first layer's weights (plain
    loading would leave whichever layer came last)."""
    unshared = build_translation_model("lite_transformer_mini", **TINY_LSRA)
    shared = build_translation_model("lite_transformer_mini", seed=1, **TINY_LSRA, encoder_share_layers=2)
    state = {name: value.clone() for name, value in unshared.state_dict().items()}
    with caplog.at_level(logging.WARNING):
        shared.load_state_dict(dict(state), strict=True)
    layer = shared.encoder.layers[1]
    assert layer.fc1.weight is shared.encoder.layers[0].fc1.weight
    assert torch.equal(layer.fc1.weight, state["encoder.layers.0.fc1.weight"])
    assert not torch.equal(layer.fc1.weight, state["encoder.layers.1.fc1.weight"])
    assert torch.equal(layer.final_layer_norm.weight, state["encoder.layers.1.final_layer_norm.weight"])  # per layer
    assert any("take that layer's values, e.g. encoder.layers.1." in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------------------
# Bad input: one line each
# ------------------------------------------------------------------------------------------------
def test_layer_count_not_a_multiple_of_k_stops_fairseq_train(tiny_translation_data: Path, tmp_path: Path) -> None:
    result = run_cli(["fairseq-train", tiny_translation_data, "--user-dir", USER_DIR, "--arch", "lite_transformer_mini",
                      "--encoder-share-layers", "2", *TINY_TRAIN, "--max-update", "1", "--save-dir", tmp_path])
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        f"{ERROR}--encoder-share-layers 2: --encoder-layers 3 is not a multiple of 2; give a K that divides the "
        "layer count, or --encoder-share-map"
    )


@pytest.mark.parametrize("options,message", [
    ({"decoder_share_layers": 0}, "--decoder-share-layers 0: K must be a positive number of layers per group"),
    ({"encoder_share_map": "0,0,1"}, "--encoder-share-map 0,0,1: 3 entries but --encoder-layers is 2; give one per layer"),
    ({"encoder_share_map": "0,x"}, "--encoder-share-map 0,x: expected comma-separated layer indices"),
    ({"encoder_share_map": "1,1"}, "--encoder-share-map 1,1: entry 0 is 1; a layer can only use the weights of itself "
                                   "or an earlier layer (0..0)"),
    ({"encoder_share_map": "0,-1"}, "--encoder-share-map 0,-1: entry 1 is -1"),
    ({"encoder_share_layers": 2, "encoder_share_map": "0,0"},
     "--encoder-share-layers 2 and --encoder-share-map 0,0 both given; give one of them"),
    ({"share_layer_norms": True}, "--share-layer-norms applies to layers that share weights; give --encoder-share-layers"),
    ({"encoder_share_layers": 2, "encoder_layers_to_keep": "0,1"},
     "--encoder-share-layers 2 cannot be combined with --encoder-layers-to-keep 0,1"),
    ({"encoder_share_layers": 2, "encoder_kernel_size_list": [3, 7]},
     "--encoder-share-layers 2: encoder layer 1 cannot use the weights of layer 0: self_attn.branches.1.weight is "
     "[4, 1, 7] there but [4, 1, 3] in layer 0; layers that share weights need equal --encoder-kernel-size-list"),
])
def test_bad_sharing_options_are_one_line_errors(options: dict, message: str) -> None:
    with pytest.raises(LayerSharingError) as error:
        build_translation_model("lite_transformer_mini", **{**TINY_LSRA, **options})
    assert str(error.value).startswith(message) and "\n" not in str(error.value), str(error.value)


def test_a_map_to_a_layer_that_is_not_its_groups_first_is_refused() -> None:
    with pytest.raises(LayerSharingError, match="--decoder-share-map 0,0,1: layer 2 maps to layer 1, which itself maps "
                                                r"to 0; map it to its group's first layer \(0\)"):
        build_translation_model("lite_transformer_mini", **{**TINY_LSRA, "decoder_layers": 3,
                                                            "decoder_kernel_size_list": [3, 3, 3]},
                                decoder_share_map="0,0,1")


def test_sanm_first_layer_of_another_width_cannot_share() -> None:
    """With the LFR front-end SAN-M's first layer reads 7 x 80 features; a map that leaves it alone works."""
    sizes = {**SMALL_SPEECH, "encoder_layers": 3, "input_layer": "lfr"}
    with pytest.raises(LayerSharingError, match=r"--encoder-share-map 0,0,0: encoder layer 1 cannot use the weights of "
                                                r"layer 0: self_attn.linear_q_k_v.weight is \[96, 32\] there but "
                                                r"\[96, 560\] in layer 0; the first layer takes the front-end's width"):
        build_speech_model("s2t_sanm_mini", encoder_share_map="0,0,0", **sizes)
    model = build_speech_model("s2t_sanm_mini", encoder_share_map="0,1,1", **sizes)
    assert model.encoder.layers[2].self_attn.linear_q_k_v.weight is model.encoder.layers[1].self_attn.linear_q_k_v.weight


# ------------------------------------------------------------------------------------------------
# fairseq-train, checkpoints, fairseq-generate
# ------------------------------------------------------------------------------------------------
def stored_bytes(state: Dict[str, torch.Tensor], keys) -> int:
    """Bytes of the distinct storages behind ``keys`` of a loaded state dict (what torch.save wrote)."""
    storages = {state[key].untyped_storage().data_ptr(): state[key].untyped_storage().nbytes() for key in keys}
    return sum(storages.values())


def test_checkpoint_stores_shared_weights_once(shared_checkpoint: Path, unshared_checkpoint: Path) -> None:
    """The shared model's checkpoint holds the layers' weights in half the bytes (norms excepted), and its
    file is smaller by those bytes plus at most the zip record of each storage no longer written."""
    unshared = torch.load(unshared_checkpoint, weights_only=False)["model"]
    shared = torch.load(shared_checkpoint, weights_only=False)["model"]
    assert shared.keys() == unshared.keys()
    second_layers = [key for key in unshared for stack in ("encoder.layers.1.", "decoder.layers.1.")
                     if key.startswith(stack) and not is_norm(key)]
    saved_once = stored_bytes(unshared, second_layers)
    layer_keys_all = [key for key in unshared if ".layers." in key]
    assert stored_bytes(shared, layer_keys_all) == stored_bytes(unshared, layer_keys_all) - saved_once
    assert saved_once > 0.45 * stored_bytes(unshared, layer_keys_all)  # norms are small: about half
    saved = unshared_checkpoint.stat().st_size - shared_checkpoint.stat().st_size
    assert saved_once <= saved <= saved_once + 320 * len(second_layers), (saved, saved_once, len(second_layers))


def test_tied_weights_stay_tied_through_training(shared_checkpoint: Path) -> None:
    state = torch.load(shared_checkpoint, weights_only=False)["model"]
    for stack in ("encoder.layers", "decoder.layers"):
        first, second = layer_keys(state, stack, 0), layer_keys(state, stack, 1)
        for name, value in second.items():
            if is_norm(name):  # per layer: both start at 1 / 0 and train apart
                assert not torch.equal(value, first[name]), (stack, name)
            else:  # one storage, written once
                assert value.data_ptr() == first[name].data_ptr(), (stack, name)


def test_fairseq_generate_decodes_a_shared_checkpoint(shared_checkpoint: Path, tiny_translation_data: Path) -> None:
    """Loaded as fairseq-generate loads it, the weights are tied again; stock and fast decoding agree."""
    models, _cfg, _task = checkpoint_utils.load_model_ensemble_and_task([str(shared_checkpoint)],
                                                                        arg_overrides={"data": str(tiny_translation_data)})
    for stack in (models[0].encoder.layers, models[0].decoder.layers):
        assert stack[1].fc2.weight is stack[0].fc2.weight
        assert stack[1].self_attn.branches[1].weight_linear.weight is stack[0].self_attn.branches[1].weight_linear.weight
    options = ["--beam", "5", "--nbest", "2"]
    stock = outputs(generate(tiny_translation_data, shared_checkpoint, *options))
    fast = outputs(generate(tiny_translation_data, shared_checkpoint, *options, "--accel-generator", "fast"))
    assert len(stock["lines"]) == 80 and stock["bleu"] > 10, stock["bleu"]  # learned: decoding is not noise
    assert fast == stock


@pytest.mark.parametrize("arch,overrides", [
    ("s2t_sanm_mini", {"encoder_share_layers": 2, "decoder_share_layers": 2}),
    ("s2t_sanm_mini", {"decoder_type": "transformer", "decoder_share_map": "0,0", "share_layer_norms": True}),
    ("s2t_lite_transformer_s", {"encoder_kernel_size_list": [3, 3], "encoder_share_layers": 2, "decoder_share_layers": 2}),
])
def test_speech_models_with_shared_layers_fast_equals_stock(arch: str, overrides: dict) -> None:
    dictionary = toy_dictionary()
    model = build_speech_model(arch, dictionary, encoder_layers=2, decoder_layers=2, **overrides)
    first, second = stacks(model)["decoder"]
    assert next(second.parameters()) is next(first.parameters())  # decoding really runs tied layers
    stock = SequenceGenerator([model], dictionary, beam_size=4, max_len_b=15)
    with torch.no_grad():
        stock_hyps = dict(enumerate(stock.generate([model], speech_sample())))
    identical, worst = compare(stock_hyps, dict(enumerate(fast_from(stock, [model]).generate([model], speech_sample()))))
    assert identical == 1.0 and worst <= 1e-4, (identical, worst)


# ------------------------------------------------------------------------------------------------
# fairseq-accel-profile
# ------------------------------------------------------------------------------------------------
def profile(*args: str) -> dict:
    result = run_cli(["fairseq-accel-profile", *args, "--no-baseline", "--format", "json"])
    assert result.returncode == 0, cli_output(result)
    return json.loads(result.stdout)["model"]


@pytest.mark.parametrize("arch,builder,sizes,options", [
    ("lite_transformer_mini", build_translation_model, TINY_LSRA, {"encoder_share_layers": 2, "decoder_share_layers": 2}),
    ("s2t_sanm_mini", build_speech_model, {**SMALL_SPEECH, "encoder_layers": 4, "decoder_layers": 3},
     {"encoder_share_map": "0,1,1,1", "decoder_share_layers": 3}),
])
def test_profile_counts_shared_weights_once_and_every_layer_run(arch, builder, sizes: dict, options: dict) -> None:
    def command_line(values: dict) -> List[str]:
        return [item for key, value in values.items()
                for item in (f"--{key.replace('_', '-')}", *(map(str, value) if isinstance(value, list) else [str(value)]))]

    unshared = profile("--arch", arch, "--vocab-size", "40", *command_line(sizes))
    shared = profile("--arch", arch, "--vocab-size", "40", *command_line({**sizes, **options}))
    model = builder(arch, **sizes)
    representatives = {"encoder": options.get("encoder_share_map"), "decoder": options.get("decoder_share_map")}
    expected = 0
    for side, layers in stacks(model).items():
        k = options.get(f"{side}_share_layers")
        reps = [int(r) for r in representatives[side].split(",")] if representatives[side] else \
            [i - i % k for i in range(len(layers))] if k else list(range(len(layers)))
        expected += sum(w.numel() for i, layer in enumerate(layers) if reps[i] != i
                        for n, w in layer.named_parameters() if not is_norm(n))
    assert expected > 0
    assert unshared["parameters"]["total"] - shared["parameters"]["total"] == expected
    assert unshared["parameters"]["non_embedding"] - shared["parameters"]["non_embedding"] == expected
    assert shared["mult_adds"] == unshared["mult_adds"]


def test_profile_of_a_shared_checkpoint(shared_checkpoint: Path) -> None:
    """--path rebuilds the tied model: its total is the number of distinct stored weights."""
    state = torch.load(shared_checkpoint, weights_only=False)["model"]
    weights = [key for key in state if not key.endswith(".version")]  # fairseq's version entries are no parameters
    assert stored_bytes(state, weights) < sum(state[key].numel() * 4 for key in weights)  # tied keys stored once
    assert profile("--path", str(shared_checkpoint))["parameters"]["total"] * 4 == stored_bytes(state, weights)


def test_fine_tuning_an_unshared_checkpoint_with_sharing(unshared_checkpoint: Path, tiny_translation_data: Path,
                                                         tmp_path: Path) -> None:
    """fairseq-train --finetune-from-model of an unshared model into a shared one: loads, says what it took."""
    log = train(tiny_translation_data, tmp_path, *SHARE_BOTH, "--finetune-from-model", str(unshared_checkpoint), updates=1)
    assert "tied weights of the checkpoint differ from their group's first layer" in log, log
