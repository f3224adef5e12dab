"""One object per model that runs the compression fine-tuning around each optimizer step: progressive
sparsity (progressive_sparsity.py) and ADMM weight quantization (admm.py), their logging and their
checkpoint state."""
from typing import Any, Dict, Optional

import torch
from fairseq.logging import metrics

from fairseq_accel.compression.admm import AdmmQuantizer
from fairseq_accel.compression.config import admm_enabled, pruning_enabled
from fairseq_accel.compression.progressive_sparsity import ProgressiveSparsity


class CompressionFineTuning:
    """Sparsity masks and/or ADMM state of ``model`` under the task's ``--sparsity-*`` / ``--admm-*`` options."""

    def __init__(self, model: torch.nn.Module, cfg: Any) -> None:
        self.sparsity: Optional[ProgressiveSparsity] = ProgressiveSparsity(model, cfg) if pruning_enabled(cfg) else None
        self.admm: Optional[AdmmQuantizer] = AdmmQuantizer(model, cfg) if admm_enabled(cfg) else None

    def masks(self) -> Dict[str, torch.Tensor]:
        return self.sparsity.masks if self.sparsity else {}

    def before_step(self, update: int) -> None:
        """Gradients of update number ``update`` (1-based) are ready; the optimizer has not stepped yet."""
        if self.sparsity:
            self.sparsity.before_step(update)
        if self.admm:
            self.admm.before_step(update, self.masks())

    def after_step(self, update: int) -> None:
        """The optimizer has stepped: masks on schedule and applied, ADMM Z/U updates, then the metrics."""
        if self.sparsity:
            self.sparsity.after_step(update)
        if self.admm:
            self.admm.after_step(update, self.masks())
        if self.sparsity:
            metrics.log_scalar("sparsity", self.sparsity.sparsity(), weight=0, round=4)
        if self.admm and self.admm.active(update):
            metrics.log_scalar("admm_distance", self.admm.distance(), weight=0, round=5)

    def state_dict(self) -> Dict[str, Any]:
        return {"sparsity": self.sparsity.state_dict() if self.sparsity else None,
                "admm": self.admm.state_dict() if self.admm else None}

    def load_state_dict(self, state: Dict[str, Any], source: Optional[str] = None) -> None:
        for part, stored in ((self.sparsity, state.get("sparsity")), (self.admm, state.get("admm"))):
            if part is not None and stored is not None:
                part.load_state_dict(stored, source)
