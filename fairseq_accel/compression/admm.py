"""ADMM weight quantization as a fine-tuning mode (Leng et al. 2018, "Extremely Low Bit Neural Network:
Squeeze the Last Bit Out with ADMM", arXiv 1707.09870; used by 2104.05784).

Training minimises ``L(W) + rho/2 * ||W - Z + U||^2`` where ``Z`` is ``W + U`` projected onto the symmetric
per-output-channel grid (quantization_grid.py) and ``U`` the scaled dual variable. The W-update is plain
fairseq training with the penalty's gradient ``rho * (W - Z + U)`` added to each weight's (already
sample-size-normalised) gradient just before the optimizer step: the same as adding the penalty to the
per-token loss, and identical on every rank. Every ``--admm-update-frequency`` updates, ``Z = proj(W + U)``
and ``U += W - Z``. Pruned weights stay zero: ``Z`` and ``U`` are masked like ``W``. From
``--admm-finalize-update`` on, ``W`` itself is projected after every step, so the checkpoints hold weights
exactly on the grid for the compressor to store losslessly. Logged: ``admm_distance`` = ||W - Z|| / ||W||.
"""
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor

from fairseq_accel.compression.errors import check_state_fits
from fairseq_accel.compression.parameter_scope import ScopedWeight, select_weights
from fairseq_accel.compression.quantization_grid import project_to_grid


class AdmmQuantizer:
    """Z and U of every weight in scope under one set of ``--admm-*`` options."""

    def __init__(self, model: torch.nn.Module, cfg: Any) -> None:
        self.cfg = cfg
        self.bits: int = cfg.admm_bits
        self.weights: List[ScopedWeight] = select_weights(model, cfg, with_overrides=False)
        self.grid: Dict[str, Tensor] = {}  # Z
        self.dual: Dict[str, Tensor] = {}  # U

    def active(self, update: int) -> bool:
        return update > self.cfg.admm_start_update

    def _start(self, masks: Dict[str, Tensor]) -> None:
        for weight in self.weights:
            self.grid[weight.name] = self._project(weight, weight.parameter.detach(), masks)
            self.dual[weight.name] = torch.zeros_like(weight.parameter, dtype=torch.float32)

    def _project(self, weight: ScopedWeight, values: Tensor, masks: Dict[str, Tensor]) -> Tensor:
        projected = project_to_grid(values.float(), self.bits)
        mask = masks.get(weight.name)
        return projected if mask is None else projected * mask.to(projected.device)

    def before_step(self, update: int, masks: Dict[str, Tensor]) -> None:
        """Add the penalty's gradient ``rho * (W - Z + U)`` before optimizer step number ``update``."""
        if not self.active(update):
            return
        if not self.grid:
            self._start(masks)
        for weight in self.weights:
            if weight.parameter.grad is not None:
                pull = weight.parameter.detach().float() - self.grid[weight.name] + self.dual[weight.name]
                weight.parameter.grad.add_(pull.to(weight.parameter.grad.dtype), alpha=self.cfg.admm_rho)

    @torch.no_grad()
    def after_step(self, update: int, masks: Dict[str, Tensor]) -> None:
        """Z/U update on schedule, and the projection of W itself from the finalize update on."""
        if not self.active(update):
            return
        if (update - self.cfg.admm_start_update) % self.cfg.admm_update_frequency == 0:
            for weight in self.weights:
                values = weight.parameter.float()
                self.grid[weight.name] = self._project(weight, values + self.dual[weight.name], masks)
                self.dual[weight.name] += values - self.grid[weight.name]
                mask = masks.get(weight.name)
                if mask is not None:
                    self.dual[weight.name] *= mask
        if self.cfg.admm_finalize_update and update >= self.cfg.admm_finalize_update:
            for weight in self.weights:
                weight.parameter.copy_(self._project(weight, weight.parameter, masks))

    def distance(self) -> float:
        """||W - Z|| / ||W|| over the scope (how far the weights still are from their grid copy)."""
        if not self.grid:
            return float("nan")
        gap = sum(float((w.parameter.detach().float() - self.grid[w.name]).pow(2).sum()) for w in self.weights)
        norm = sum(float(w.parameter.detach().float().pow(2).sum()) for w in self.weights)
        return (gap / max(norm, 1e-30)) ** 0.5

    def state_dict(self) -> Dict[str, Any]:
        return {"grid": {k: v.cpu().clone() for k, v in self.grid.items()},
                "dual": {k: v.cpu().clone() for k, v in self.dual.items()}}

    def load_state_dict(self, state: Dict[str, Any], source: Optional[str] = None) -> None:
        """Take Z and U saved by :meth:`state_dict` (both empty when ADMM had not started yet)."""
        if state["grid"]:
            shapes = {w.name: w.parameter.shape for w in self.weights}
            check_state_fits("ADMM grid copies", state["grid"], shapes, source)
            check_state_fits("ADMM duals", state["dual"], shapes, source)
        devices = {w.name: w.parameter.device for w in self.weights}
        self.grid = {name: value.to(devices[name], torch.float32) for name, value in state["grid"].items()}
        self.dual = {name: value.to(devices[name], torch.float32) for name, value in state["dual"].items()}
