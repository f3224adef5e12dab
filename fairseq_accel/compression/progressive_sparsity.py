"""Progressive sparsity during fine-tuning: weight importance, masks that grow on a schedule, and their state.

Gradual pruning after Zhu & Gupta 2017 (arXiv 1710.01878), with the importance re-estimated at every mask
update as 2104.05784 does: from ``--sparsity-start-update`` t0 to ``--sparsity-end-update`` t1, every
``--sparsity-frequency`` updates (and at t1), each weight matrix in scope is pruned to

    cubic:  s(t) = S * (1 - (1 - (t - t0) / (t1 - t0)) ** 3)        linear: s(t) = S * (t - t0) / (t1 - t0)

of its weights by removing the least important units of its pattern (per matrix, or with one global
threshold). Importance is ``|w|`` or the first-order Taylor estimate ``|w * dL/dw|`` summed over the updates
since the last mask update. Removed weights stay removed, the masks are applied to the weights after every
optimizer step (so the forward always sees them), and after t1 they are fixed.

Under fairseq's distributed training every rank holds the same weights and (already all-reduced) gradients;
the importance is all-reduced (averaged) over the data-parallel group once more before thresholding, and
ties break by position, so every rank computes the same masks. The masks, the importance accumulated so far
and the schedule position go into the checkpoint (``task_state``), so ``--restore-file`` continues exactly.
"""
import logging
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor

from fairseq_accel.compression.errors import check_state_fits
from fairseq_accel.compression.parameter_scope import ScopedWeight, select_weights
from fairseq_accel.compression.sparsity_patterns import REMOVED, Units, parse_pattern, prune_least_important

logger = logging.getLogger(__name__)


def scheduled_fraction(update: int, start: int, end: int, schedule: str) -> float:
    """The share of the final sparsity reached after ``update`` (0 before ``start``, 1 from ``end`` on)."""
    progress = min(max((update - start) / (end - start), 0.0), 1.0)
    return 1.0 - (1.0 - progress) ** 3 if schedule == "cubic" else progress


def all_reduce_mean(tensors: List[Tensor]) -> None:
    """Average ``tensors`` in place over fairseq's data-parallel group (nothing on a single process)."""
    from fairseq.distributed import utils as distributed_utils

    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return
    world_size = distributed_utils.get_data_parallel_world_size()
    if world_size == 1:
        return
    flat = torch.cat([t.flatten() for t in tensors])
    distributed_utils.all_reduce(flat, group=distributed_utils.get_data_parallel_group())
    flat /= world_size
    offset = 0
    for tensor in tensors:
        tensor.copy_(flat[offset: offset + tensor.numel()].view_as(tensor))
        offset += tensor.numel()


class ProgressiveSparsity:
    """The masks of one model under one set of ``--sparsity-*`` options."""

    def __init__(self, model: torch.nn.Module, cfg: Any) -> None:
        self.cfg = cfg
        self.pattern = parse_pattern(cfg.sparsity_pattern)
        self.weights: List[ScopedWeight] = select_weights(model, cfg, with_overrides=True)
        for weight in self.weights:
            self.pattern.check_shape(weight.name, tuple(weight.parameter.shape))
        self.masks: Dict[str, Tensor] = {w.name: torch.ones_like(w.parameter, dtype=torch.bool) for w in self.weights}
        self.taylor: Dict[str, Tensor] = (
            {w.name: torch.zeros_like(w.parameter, dtype=torch.float32) for w in self.weights}
            if cfg.sparsity_importance == "taylor" else {}
        )

    # -- during training -------------------------------------------------------------------------------
    def before_step(self, update: int) -> None:
        """Before optimizer step number ``update`` (1-based), gradients ready: add this update's
        ``|w * grad|`` to the taylor importance while masks are still to be computed."""
        if not self.taylor or update > self.cfg.sparsity_end_update:
            return
        for weight in self.weights:
            if weight.parameter.grad is not None:
                self.taylor[weight.name] += (weight.parameter.detach() * weight.parameter.grad.detach()).abs().float()

    def after_step(self, update: int) -> None:
        """After optimizer step number ``update`` (1-based): recompute the masks when the schedule says so,
        then apply them."""
        cfg = self.cfg
        start, end = cfg.sparsity_start_update, cfg.sparsity_end_update
        if start < update <= end and ((update - start) % cfg.sparsity_frequency == 0 or update == end):
            self.update_masks(scheduled_fraction(update, start, end, cfg.sparsity_schedule))
            if update == end:
                logger.info("sparsity reached at update %d:\n%s", update, self.report())
        self.apply_masks()

    def importance(self, weight: ScopedWeight) -> Tensor:
        """This process's importance of ``weight`` (a copy; :meth:`update_masks` averages it over ranks)."""
        values = self.taylor[weight.name] if self.taylor else weight.parameter.detach().abs().float()
        return values.clone()

    def update_masks(self, fraction: float) -> None:
        """Prune every weight matrix to ``fraction`` of its target sparsity."""
        scores = [self.importance(weight) for weight in self.weights]
        all_reduce_mean(scores)  # on the parameters' device (gloo: CPU, NCCL: CUDA); the ranking runs on the CPU
        scores = [score.masked_fill(~self.masks[w.name], REMOVED).cpu() for w, score in zip(self.weights, scores)]
        together = ([i for i, w in enumerate(self.weights) if w.override is None]
                    if self.cfg.sparsity_threshold == "global" else [])
        if together:
            self._prune_together(together, scores, fraction * self.cfg.sparsity_target)
        for i, weight in enumerate(self.weights):
            if i not in together:
                target = self.cfg.sparsity_target if weight.override is None else weight.override
                self._prune_together([i], scores, fraction * target)
        for accumulated in self.taylor.values():
            accumulated.zero_()

    def _prune_together(self, members: List[int], scores: List[Tensor], sparsity: float) -> None:
        units = [self.pattern.units(scores[i]) for i in members]
        joined = Units(*(torch.cat([getattr(u, field) for u in units]) for field in ("importance", "size", "index")))
        flags = prune_least_important(joined, sparsity * sum(scores[i].numel() for i in members))
        for i, unit, removed in zip(members, units, torch.split(flags, [len(u.importance) for u in units])):
            weight = self.weights[i]
            self.masks[weight.name] = self.pattern.mask(weight.parameter.shape, unit, removed).to(weight.parameter.device)

    @torch.no_grad()
    def apply_masks(self) -> None:
        for weight in self.weights:
            weight.parameter.mul_(self.masks[weight.name])

    # -- reporting -------------------------------------------------------------------------------------
    def sparsity(self) -> float:
        """Share of zero weights over the whole scope, by the masks."""
        removed = sum(int((~mask).sum()) for mask in self.masks.values())
        return removed / sum(mask.numel() for mask in self.masks.values())

    def report(self) -> str:
        """Per-matrix table: name, shape, weights, sparsity."""
        rows = [f"{'parameter':<48} {'shape':>12} {'weights':>9} {'sparsity':>8}"]
        for weight in self.weights:
            mask = self.masks[weight.name]
            shape = "x".join(map(str, mask.shape))
            rows.append(f"{weight.name:<48} {shape:>12} {mask.numel():>9} {1 - mask.float().mean().item():>8.3f}")
        rows.append(f"{'total':<48} {'':>12} {sum(m.numel() for m in self.masks.values()):>9} {self.sparsity():>8.3f}")
        return "\n".join(rows)

    # -- checkpoint ------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {"masks": {name: mask.cpu().clone() for name, mask in self.masks.items()},
                "taylor": {name: value.cpu().clone() for name, value in self.taylor.items()}}

    def load_state_dict(self, state: Dict[str, Any], source: Optional[str] = None) -> None:
        """Take masks (and taylor sums) saved by :meth:`state_dict`; they must name the same weights."""
        shapes = {w.name: w.parameter.shape for w in self.weights}
        check_state_fits("sparsity masks", state["masks"], shapes, source)
        devices = {w.name: w.parameter.device for w in self.weights}
        self.masks = {name: mask.to(devices[name], torch.bool) for name, mask in state["masks"].items()}
        if self.taylor:
            check_state_fits("taylor importance", state["taylor"], shapes, source)
            self.taylor = {name: value.to(devices[name], torch.float32) for name, value in state["taylor"].items()}
        self.apply_masks()
