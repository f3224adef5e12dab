"""What the accel tasks add to ``fairseq-train``: compression fine-tuning (``--sparsity-*``, ``--admm-*``,
``--compress-*``; fairseq_accel/compression/).

The task checks the options when it is set up, builds the :class:`CompressionFineTuning` of the model it
builds, runs it around every optimizer step (``FairseqTask.optimizer_step``, which fairseq's trainer calls
once per update after gradients are all-reduced and normalised), and keeps its state in the checkpoint's
``task_state`` under ``COMPRESSION_KEY``. Checkpoints are read back by ``fairseq-train --restore-file``
(the compat patch hands ``task_state`` to the task); ``fairseq-generate`` needs nothing from it, since the
weights themselves are saved pruned/projected.
"""
from typing import Any, Dict, Optional

from fairseq_accel.compression import COMPRESSION_KEY
from fairseq_accel.compression.config import check_compression_options, compression_enabled
from fairseq_accel.compression.fine_tuning import CompressionFineTuning
from fairseq_accel.tasks.task_options import TaskOptionsMixin


class CompressionTrainingMixin(TaskOptionsMixin):
    """Put before the stock task class; reads its options through ``task_options()``."""

    compression: Optional[CompressionFineTuning] = None
    _stored_compression: Optional[Dict[str, Any]] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        check_compression_options(self.task_options())

    def build_model(self, *args: Any, **kwargs: Any):
        model = super().build_model(*args, **kwargs)
        if compression_enabled(self.task_options()):
            self.compression = CompressionFineTuning(model, self.task_options())
            if self._stored_compression is not None:
                self.compression.load_state_dict(self._stored_compression)
                self._stored_compression = None
        return model

    def optimizer_step(self, optimizer, model, update_num: int) -> None:
        if self.compression is None:
            return super().optimizer_step(optimizer, model, update_num)
        self.compression.before_step(update_num + 1)
        super().optimizer_step(optimizer, model, update_num)
        self.compression.after_step(update_num + 1)

    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        if self.compression is not None:
            state[COMPRESSION_KEY] = self.compression.state_dict()
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        stored = state_dict.pop(COMPRESSION_KEY, None)
        if stored is not None:
            if self.compression is not None:
                self.compression.load_state_dict(stored)
            else:  # generation path: the task state comes before the model
                self._stored_compression = stored
        super().load_state_dict(state_dict)
