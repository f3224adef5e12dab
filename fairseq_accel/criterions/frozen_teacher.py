"""A frozen teacher model for distillation, loaded from a fairseq checkpoint and kept out of training.

fairseq 0.12's Trainer optimizes ``criterion.parameters()`` and saves ``criterion.state_dict()`` next to
the model's, so a teacher registered as a submodule of the criterion would be trained and saved with
the student. :class:`FrozenTeacher` is a plain object (not an ``nn.Module``): a criterion holding it
registers nothing; its model has ``requires_grad`` off, stays in eval mode and runs under ``no_grad``.

The checkpoint is read by fairseq's ``load_checkpoint_to_cpu``, which the plugin replaces with its
weights-only loader (:mod:`fairseq_accel.compat.checkpoint_loading`): nothing outside the allowlist or the
user's trusted checkpoints is unpickled, and a bad file is one ``CheckpointLoadError``.
"""
import os
from typing import Any, Dict, Optional

import torch
from fairseq import checkpoint_utils, models
from torch import nn

from fairseq_accel.compat.checkpoint_files import CheckpointLoadError, CheckpointNotFoundError, folder_listing
from fairseq_accel.compat.checkpoint_loading import size_mismatch_message
from fairseq_accel.tasks.vocabulary_check import VOCABULARIES_KEY, VocabularyMismatchError


def check_teacher_file(path: str) -> None:
    """One :class:`CheckpointNotFoundError` naming ``--teacher-path`` if it is not a file."""
    if not path:
        raise CheckpointNotFoundError("--teacher-path is required: the checkpoint of the teacher model")
    if not os.path.isfile(path):
        what = "is a folder" if os.path.isdir(path) else "does not exist"
        listed = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
        raise CheckpointNotFoundError(
            f"--teacher-path {path} {what}; {folder_listing(listed)}; pass the teacher's checkpoint file"
        )


def _dictionary_rows(state_dict: Dict[str, torch.Tensor], key: str) -> Optional[int]:
    weight = state_dict.get(key)
    return None if weight is None else int(weight.shape[0])


def check_teacher_dictionaries(path: str, state: Dict[str, Any], task: Any) -> None:
    """Refuse a teacher trained with other dictionaries than the task's (one error naming both).

    A checkpoint of the accel tasks stores its vocabularies (:mod:`fairseq_accel.tasks.vocabulary_check`):
    they are compared symbol by symbol. Any checkpoint is also checked by its embedding sizes, which is
    all a stock task's checkpoint allows.
    """
    stored = (state.get("task_state") or {}).get(VOCABULARIES_KEY)
    if stored is not None and hasattr(task, "check_vocabularies"):
        try:
            task.check_vocabularies(stored)
        except VocabularyMismatchError as error:
            raise VocabularyMismatchError(f"--teacher-path {path}: {error}") from None
    sides = (("target", "decoder.embed_tokens.weight", task.target_dictionary),
             ("source", "encoder.embed_tokens.weight", getattr(task, "source_dictionary", None)))
    for side, key, dictionary in sides:
        rows = _dictionary_rows(state["model"], key)
        if dictionary is not None and rows is not None and rows != len(dictionary):
            raise VocabularyMismatchError(
                f"--teacher-path {path}: the teacher's {side} dictionary has {rows} symbols ({key}), the task's "
                f"has {len(dictionary)}: distillation needs a teacher trained on the same dictionaries"
            )


def load_teacher(path: str, task: Any) -> nn.Module:
    """Build the checkpoint's model for ``task`` (its dictionaries) and load its weights strictly.

    The model is built with ``fairseq.models.build_model``, not ``task.build_model``, whose side effects
    (the validation BLEU generator, compression hooks) belong to the student.
    """
    check_teacher_file(path)
    state = checkpoint_utils.load_checkpoint_to_cpu(path)
    check_teacher_dictionaries(path, state, task)
    model_cfg = state["cfg"].model
    model = models.build_model(model_cfg, task, from_checkpoint=True)
    try:
        model.load_state_dict(state["model"], strict=True, model_cfg=model_cfg)
    except RuntimeError as error:
        message = size_mismatch_message([path], error)
        if message is None:
            raise
        raise CheckpointLoadError(f"--teacher-path: {message}") from None
    return model


class FrozenTeacher:
    """A teacher model that never trains: no gradients, eval mode, not a submodule of its holder."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval().requires_grad_(False)

    def follow(self, student: nn.Module) -> None:
        """Move to the student's device and dtype (the Trainer moves the criterion, not this object)."""
        reference = next(student.parameters())
        first = next(self.model.parameters())
        if first.device != reference.device or first.dtype != reference.dtype:
            self.model.to(device=reference.device, dtype=reference.dtype)

    def __call__(self, net_input: Dict[str, Any]) -> Any:
        """``model(**net_input)`` in eval mode, without building a graph."""
        self.model.eval()
        with torch.no_grad():
            return self.model(**net_input)
