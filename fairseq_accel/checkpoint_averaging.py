"""Average the parameters of the last N checkpoints of one training run into one checkpoint.

Averaging the last epoch checkpoints is how the Lite Transformer paper evaluates (arXiv 2004.11886,
Sec. 4: "average the last 10 checkpoints"); it smooths the noise of the final updates at no decoding
cost. The output is an ordinary fairseq checkpoint (the newest input's state with averaged weights) that
``fairseq-generate`` and ``fairseq-accel-profile`` load like any other.

Inputs are read with the plugin's safe loader (no arbitrary unpickling) and must come from one run: the
same parameter names, shapes and dtypes, and, for a compression fine-tune, the same sparsity masks
(averaging weights pruned by different masks would make them dense again) and no ADMM grid (an average of
grid points is off the grid).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from fairseq_accel.compat.checkpoint_loading import read_checkpoint
from fairseq_accel.compression import COMPRESSION_KEY

EPOCH_CHECKPOINT = re.compile(r"checkpoint(\d+)\.pt")  # fairseq's name of an end-of-epoch checkpoint
UPDATE_CHECKPOINT = re.compile(r"checkpoint_\d+_(\d+)\.pt")  # --save-interval-updates: checkpoint_<epoch>_<update>.pt


class CheckpointAveragingError(ValueError):
    """One line that names the checkpoint and what keeps it from being averaged."""


def last_checkpoints(folder: Path, count: int, by_update: bool, upper_bound: Optional[int] = None) -> List[Path]:
    """The ``count`` newest epoch (or, ``by_update``, update-interval) checkpoints of ``folder``, oldest first,
    leaving out those after ``upper_bound`` (an epoch or update number)."""
    if not folder.is_dir():
        raise CheckpointAveragingError(f"{folder}: not a folder of checkpoints")
    pattern = UPDATE_CHECKPOINT if by_update else EPOCH_CHECKPOINT
    numbered = sorted(
        (int(match.group(1)), path)
        for path in folder.iterdir()
        if (match := pattern.fullmatch(path.name)) and (upper_bound is None or int(match.group(1)) <= upper_bound)
    )
    if count < 1:
        raise CheckpointAveragingError(f"the number of checkpoints to average must be at least 1, got {count}")
    if len(numbered) < count:
        kind, how = (("update", "fairseq-train --save-interval-updates U --keep-interval-updates N") if by_update
                     else ("epoch", "fairseq-train without --no-epoch-checkpoints, with --keep-last-epochs N"))
        bound = f" up to {upper_bound}" if upper_bound is not None else ""
        raise CheckpointAveragingError(
            f"{folder}: {len(numbered)} {kind} checkpoints ({pattern.pattern}){bound}, {count} asked; "
            f"save them with {how}")
    return [path for _, path in numbered[-count:]]


def _compression_state(state: Dict[str, Any]) -> Dict[str, Any]:
    return (state.get("task_state") or {}).get(COMPRESSION_KEY) or {}


def _sparsity_masks(state: Dict[str, Any]) -> Optional[Dict[str, torch.Tensor]]:
    return (_compression_state(state).get("sparsity") or {}).get("masks")


def _check_compression(path: Path, state: Dict[str, Any], first_path: Path,
                       first_masks: Optional[Dict[str, torch.Tensor]]) -> None:
    """No ADMM grid, and the same sparsity masks as the first checkpoint (or none in both)."""
    if (_compression_state(state).get("admm") or {}).get("grid"):
        raise CheckpointAveragingError(
            f"{path}: ADMM-quantized weights (an average of grid points is off the grid); decode the last checkpoint "
            "of the ADMM fine-tune instead")
    masks = _sparsity_masks(state)
    if masks is None and first_masks is None:
        return
    same = (masks is not None and first_masks is not None and masks.keys() == first_masks.keys()
            and all(torch.equal(mask, first_masks[name]) for name, mask in masks.items()))
    if not same:
        raise CheckpointAveragingError(
            f"{path}: sparsity masks differ from {first_path}'s (pruning was still under way, or another run); "
            "average checkpoints saved after --sparsity-end-update")


def _check_same_parameters(path: Path, model: Dict[str, torch.Tensor], first_path: Path,
                           first: Dict[str, torch.Tensor]) -> None:
    missing = sorted(set(first) - set(model))
    extra = sorted(set(model) - set(first))
    if missing or extra:
        what = f"lacks {missing[0]}" if missing else f"has {extra[0]}"
        raise CheckpointAveragingError(
            f"{path}: parameters differ from {first_path}'s ({what}, {len(missing)} missing, {len(extra)} extra); "
            "average checkpoints of one model")
    for name, tensor in model.items():
        expected = first[name]
        if tensor.shape != expected.shape or tensor.dtype != expected.dtype:
            raise CheckpointAveragingError(
                f"{path}: parameter {name} is {tensor.dtype} {list(tensor.shape)}, {first_path} has "
                f"{expected.dtype} {list(expected.shape)}; average checkpoints of one model")


def average_checkpoints(paths: Sequence[Path], progress: Callable[[str], None] = lambda line: None) -> Dict[str, Any]:
    """The state of the last of ``paths`` with every floating-point model tensor replaced by the mean over
    all ``paths`` (accumulated in float64); other tensors (counters, integer buffers) must agree.
    ``progress`` gets one line per checkpoint read."""
    if not paths:
        raise CheckpointAveragingError("no checkpoints to average")
    sums: Dict[str, torch.Tensor] = {}
    first_path = Path(paths[0])
    first: Dict[str, torch.Tensor] = {}
    first_masks: Optional[Dict[str, torch.Tensor]] = None
    state: Dict[str, Any] = {}
    for index, path in enumerate(map(Path, paths)):
        progress(f"reading {path} ({index + 1}/{len(paths)})")
        state = read_checkpoint(str(path))
        if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
            raise CheckpointAveragingError(f"{path}: not a fairseq checkpoint (no 'model' state)")
        model = state["model"]
        if index == 0:
            first, first_masks = dict(model), _sparsity_masks(state)
        else:
            _check_same_parameters(path, model, first_path, first)
        _check_compression(path, state, first_path, first_masks)
        for name, tensor in model.items():
            if tensor.is_floating_point():
                sums[name] = tensor.to(torch.float64, copy=True) if index == 0 else sums[name].add_(tensor)
            elif not torch.equal(tensor, first[name]):
                raise CheckpointAveragingError(
                    f"{path}: non-float tensor {name} differs from {first_path}'s; it cannot be averaged")
    averaged = dict(state["model"])
    for name, total in sums.items():
        averaged[name] = total.div_(len(paths)).to(first[name].dtype)
    state["model"] = averaged
    extra_state = dict(state.get("extra_state") or {})
    extra_state["averaged_checkpoints"] = [str(path) for path in paths]
    state["extra_state"] = extra_state
    return state
