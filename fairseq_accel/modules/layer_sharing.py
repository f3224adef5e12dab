"""Cross-layer weight sharing: several layers of a stack use one set of weights.

As in ALBERT (Lan et al., arXiv:1909.11942) and the SAN-M compression of "Extremely Low Footprint
End-to-End ASR System for Smart Device" (arXiv:2104.05784): the layers keep running in sequence (the
computation and the Mult-Adds are those of every layer), but a group of layers holds one copy of the
weights, so the model, its checkpoint and its optimizer state shrink with the number of distinct layers.

A stack's sharing is a *map*: layer ``i`` uses the weights of layer ``map[i]``, its group's representative
(``map[i] <= i`` and ``map[map[i]] == map[i]``). ``--encoder-share-layers K`` is the map of groups of K
consecutive layers (``map[i] = i - i % K``: ``0,0,2,2,4,4`` for K = 2 and 6 layers); ``--encoder-share-map``
gives one explicitly, e.g. ``0,0,0,3,3,3`` or ``0,1,1,3,3,5``. Tying registers the representative's ``nn.Parameter`` objects in every layer of its group,
so gradients of all those layers accumulate into them, ``model.parameters()`` lists them once, and
``torch.save`` stores each once (state-dict keys of one storage are written once). Layer norms stay per
layer unless ``--share-layer-norms`` is given (ALBERT shares them; per-layer norms cost little).
"""
import argparse
import logging
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

SIDES = ("encoder", "decoder")


class LayerSharingError(ValueError):
    """A sharing option that cannot be applied: bad K or map, or layers whose weights differ in shape."""


@dataclass(frozen=True)
class ShareMap:
    """Which layer's weights each layer of one stack uses, and the option that asked for it (for messages)."""

    representatives: Tuple[int, ...]
    option: str

    def shared_layers(self) -> List[Tuple[int, int]]:
        """``(layer, representative)`` of every layer that uses another layer's weights."""
        return [(layer, rep) for layer, rep in enumerate(self.representatives) if rep != layer]


def add_layer_sharing_args(parser: argparse.ArgumentParser, sides: Sequence[str] = SIDES) -> None:
    """``--{side}-share-layers K``, ``--{side}-share-map MAP`` for each of ``sides``, and ``--share-layer-norms``."""
    # fmt: off
    for side in sides:
        parser.add_argument(f"--{side}-share-layers", type=int, metavar="K",
                            help=f"groups of K consecutive {side} layers share one set of weights (cross-layer "
                                 f"sharing, arXiv:2104.05784); --{side}-layers must be a multiple of K")
        parser.add_argument(f"--{side}-share-map", metavar="MAP",
                            help=f"comma-separated: {side} layer i uses the weights of layer MAP[i], e.g. 0,0,0,3,3,3; "
                                 "one entry per layer, MAP[i] <= i, and MAP[i] must map to itself")
    parser.add_argument("--share-layer-norms", action="store_true",
                        help="layers that share weights share their layer norms too (default: per layer)")
    # fmt: on


def groups_of(k: int, num_layers: int, side: str) -> ShareMap:
    """The map of ``--{side}-share-layers k`` over ``num_layers`` layers."""
    option = f"--{side}-share-layers {k}"
    if k < 1:
        raise LayerSharingError(f"{option}: K must be a positive number of layers per group")
    if num_layers % k:
        raise LayerSharingError(
            f"{option}: --{side}-layers {num_layers} is not a multiple of {k}; give a K that divides the layer "
            f"count, or --{side}-share-map"
        )
    return ShareMap(tuple(layer - layer % k for layer in range(num_layers)), option)


def parse_share_map(text: str, num_layers: int, side: str) -> ShareMap:
    """Parse and validate ``--{side}-share-map text`` for a stack of ``num_layers`` layers."""
    option = f"--{side}-share-map {text}"
    try:
        representatives = tuple(int(field) for field in str(text).split(","))
    except ValueError:
        raise LayerSharingError(f"{option}: expected comma-separated layer indices, e.g. 0,0,2,2") from None
    if len(representatives) != num_layers:
        raise LayerSharingError(
            f"{option}: {len(representatives)} entries but --{side}-layers is {num_layers}; give one per layer"
        )
    for layer, rep in enumerate(representatives):
        if not 0 <= rep <= layer:
            raise LayerSharingError(
                f"{option}: entry {layer} is {rep}; a layer can only use the weights of itself or an earlier "
                f"layer (0..{layer})"
            )
        if representatives[rep] != rep:
            raise LayerSharingError(
                f"{option}: layer {layer} maps to layer {rep}, which itself maps to {representatives[rep]}; "
                f"map it to its group's first layer ({representatives[rep]})"
            )
    return ShareMap(representatives, option)


def share_map_of(args, side: str, num_layers: int) -> Optional[ShareMap]:
    """The sharing ``args`` ask for on ``side`` (a stack of ``num_layers``), or None for none."""
    k = getattr(args, f"{side}_share_layers", None)
    text = getattr(args, f"{side}_share_map", None)
    if k is not None and text is not None:
        raise LayerSharingError(
            f"--{side}-share-layers {k} and --{side}-share-map {text} both given; give one of them"
        )
    if k is None and text is None:
        return None
    share_map = groups_of(k, num_layers, side) if k is not None else parse_share_map(text, num_layers, side)
    kept = getattr(args, f"{side}_layers_to_keep", None)
    if kept:
        raise LayerSharingError(
            f"{share_map.option} cannot be combined with --{side}-layers-to-keep {kept}: pruning renumbers the "
            "layers the map refers to"
        )
    return share_map


def _is_layer_norm(module: nn.Module) -> bool:
    """torch's LayerNorm, or a fused one (fairseq's ``LayerNorm`` returns apex's on CUDA where installed)."""
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("LayerNorm")


def _shared_parameters(layer: nn.Module, share_layer_norms: bool) -> Dict[str, Tuple[nn.Module, str]]:
    """``{qualified name: (owning module, attribute)}`` of the parameters of ``layer`` that sharing ties."""
    found = {}
    for module_name, module in layer.named_modules():
        if _is_layer_norm(module) and not share_layer_norms:
            continue
        for name, parameter in module.named_parameters(recurse=False):
            found[f"{module_name}.{name}" if module_name else name] = (module, name)
    return found


def _shape(module: nn.Module, name: str) -> Tuple[int, ...]:
    return tuple(getattr(module, name).shape)


def _check_compatible(
    layer: nn.Module, rep: nn.Module, index: int, rep_index: int, share_map: ShareMap, side: str,
    share_layer_norms: bool, hint: str,
) -> None:
    """Refuse, in one line, a layer whose shared parameters differ in name or shape from its representative's."""
    where = f"{share_map.option}: {side} layer {index} cannot use the weights of layer {rep_index}"
    if type(layer) is not type(rep):
        raise LayerSharingError(f"{where}: it is a {type(layer).__name__}, layer {rep_index} a {type(rep).__name__}")
    mine = _shared_parameters(layer, share_layer_norms)
    theirs = _shared_parameters(rep, share_layer_norms)
    if mine.keys() != theirs.keys():
        differing = sorted(mine.keys() ^ theirs.keys())
        raise LayerSharingError(f"{where}: their parameters differ ({', '.join(differing)})")
    for name, (module, attribute) in mine.items():
        shape, rep_shape = _shape(module, attribute), _shape(*theirs[name])
        if shape != rep_shape:
            raise LayerSharingError(
                f"{where}: {name} is {list(shape)} there but {list(rep_shape)} in layer {rep_index}"
                + (f"; {hint}" if hint else "")
            )


def tie_layers(
    layers: Sequence[nn.Module], share_map: ShareMap, side: str, share_layer_norms: bool = False, hint: str = ""
) -> None:
    """Register each representative's parameters in every layer of its group (layer norms only with
    ``share_layer_norms``). All layers are checked before any is changed; ``hint`` ends a shape error."""
    pairs = share_map.shared_layers()
    for index, rep_index in pairs:
        _check_compatible(layers[index], layers[rep_index], index, rep_index, share_map, side, share_layer_norms, hint)
    for index, rep_index in pairs:
        theirs = _shared_parameters(layers[rep_index], share_layer_norms)
        for name, (module, attribute) in _shared_parameters(layers[index], share_layer_norms).items():
            rep_module, rep_attribute = theirs[name]
            setattr(module, attribute, getattr(rep_module, rep_attribute))


def share_layers(args, stacks: Mapping[str, Sequence[nn.Module]], hints: Optional[Mapping[str, str]] = None) -> None:
    """Apply the sharing options of ``args`` to the layer ``stacks`` of a model (``{"encoder": layers, ...}``).

    Every option is validated first; ``--share-layer-norms`` without any sharing is refused (it would be
    ignored). ``hints`` (per side) end a shape error with what the user can change.
    """
    maps = {side: share_map_of(args, side, len(layers)) for side, layers in stacks.items()}
    share_layer_norms = bool(getattr(args, "share_layer_norms", False))
    if share_layer_norms and not any(maps.values()):
        given = " or ".join(f"--{side}-share-layers/--{side}-share-map" for side in stacks)
        raise LayerSharingError(f"--share-layer-norms applies to layers that share weights; give {given}")
    for side, share_map in maps.items():
        if share_map is not None:
            tie_layers(stacks[side], share_map, side, share_layer_norms, (hints or {}).get(side, ""))


def tie_state_dict(model: nn.Module, state_dict: Dict[str, Tensor]) -> None:
    """Give every key of a tied parameter of ``model`` its first key's value, in ``state_dict`` (in place).

    Loading copies each key into its parameter, so of tied keys with different values the last one would
    win silently. They differ only in a checkpoint trained without this sharing (fine-tuning an unshared
    model into a shared one): each group then starts from its representative's (first layer's) weights.
    """
    first_name: Dict[int, str] = {}
    replaced = []
    for name, parameter in model.named_parameters(remove_duplicate=False):
        first = first_name.setdefault(id(parameter), name)
        if first != name and name in state_dict and first in state_dict:
            if not torch.equal(state_dict[name], state_dict[first]):
                replaced.append(name)
            state_dict[name] = state_dict[first]
    if replaced:
        logger.warning(
            f"{len(replaced)} tied weights of the checkpoint differ from their group's first layer (it was trained "
            f"without this cross-layer sharing); they take that layer's values, e.g. {replaced[0]}"
        )


class SharedLayersModel:
    """Model mixin (before the fairseq model class in the bases): ``build_model`` ties the layers that the
    sharing options ask for; loading a checkpoint keeps tied weights consistent (see :func:`tie_state_dict`).

    A subclass says where its stacks are (:meth:`layer_stacks`) and may add hints (:meth:`sharing_hints`).
    """

    @classmethod
    def build_model(cls, args, task):
        model = super().build_model(args, task)
        share_layers(args, cls.layer_stacks(model), cls.sharing_hints(args))
        return model

    @classmethod
    def layer_stacks(cls, model) -> Dict[str, Sequence[nn.Module]]:
        """The stacks sharing applies to: ``encoder.layers`` and ``decoder.layers``."""
        return {"encoder": model.encoder.layers, "decoder": model.decoder.layers}

    @classmethod
    def sharing_hints(cls, args) -> Dict[str, str]:
        """Per side, what makes the layers' shapes equal where they are not."""
        return {}

    def upgrade_state_dict(self, state_dict: Dict[str, Tensor]) -> None:
        """fairseq's upgrade of older checkpoints (run by ``load_state_dict``), then :func:`tie_state_dict`."""
        super().upgrade_state_dict(state_dict)
        tie_state_dict(self, state_dict)
