"""Refuse to decode a checkpoint with vocabularies other than those it was trained with.

A dictionary of the same size in another order loads without complaint and turns every output into
garbage; one of another size fails deep inside ``load_state_dict``. fairseq 0.12 saves
``task.state_dict()`` in every checkpoint (``state["task_state"]``) and, in
``load_model_ensemble_and_task``, calls ``task.load_state_dict(state["task_state"])`` on the task that
will decode before it builds the model. ``VocabularyCheckMixin`` stores there, under
``VOCABULARIES_KEY``, each vocabulary's ordered symbols and the file they came from, and compares them
on load with the vocabularies the task has just read: a mismatch is one :class:`VocabularyMismatchError`
naming both files and the first difference. A checkpoint without the key (stock fairseq tasks, older
checkpoints) loads as before.
"""
from typing import Any, Dict, List, NamedTuple, Optional

VOCABULARIES_KEY = "fairseq_accel_vocabularies"


class VocabularyMismatchError(ValueError):
    """The vocabulary loaded now is not the one the checkpoint was trained with."""


class Vocabulary(NamedTuple):
    """A vocabulary as the model sees it: index ``i`` means ``symbols[i]``; ``path``: where it was read."""

    path: str
    symbols: List[str]


def sentencepiece_vocabulary(model_path: str) -> Vocabulary:
    """The ordered pieces of a sentencepiece model."""
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_file=model_path)
    return Vocabulary(model_path, [processor.id_to_piece(i) for i in range(processor.get_piece_size())])


def vocabulary_difference(trained: List[str], loaded: List[str]) -> Optional[str]:
    """How ``loaded`` differs from ``trained`` (size, or the first index whose symbol differs), or None."""
    if len(trained) != len(loaded):
        return f"it has {len(loaded)} symbols, the checkpoint's has {len(trained)}"
    for index, (before, now) in enumerate(zip(trained, loaded)):
        if before != now:
            return f"symbol {index} is {now!r} in it but {before!r} in the checkpoint's"
    return None


class VocabularyCheckMixin:
    """Put before the stock task class; the task implements ``vocabularies()``."""

    def vocabularies(self) -> Dict[str, Vocabulary]:
        """The task's vocabularies by role (e.g. ``target dictionary``), as read from its data."""
        raise NotImplementedError

    def state_dict(self) -> Dict[str, Any]:
        stored = {role: {"path": v.path, "symbols": list(v.symbols)} for role, v in self.vocabularies().items()}
        return {**super().state_dict(), VOCABULARIES_KEY: stored}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        trained = state_dict.pop(VOCABULARIES_KEY, None)
        if trained is not None:
            self.check_vocabularies(trained)
        super().load_state_dict(state_dict)

    def check_vocabularies(self, trained: Dict[str, Dict[str, Any]]) -> None:
        """Raise :class:`VocabularyMismatchError` unless every stored vocabulary matches the loaded one."""
        loaded = self.vocabularies()
        for role, stored in trained.items():
            if role not in loaded:  # e.g. no sentencepiece model in this data config: nothing maps through it
                continue
            difference = vocabulary_difference(stored["symbols"], loaded[role].symbols)
            if difference is not None:
                raise VocabularyMismatchError(
                    f"{role} {loaded[role].path} is not the one the checkpoint was trained with "
                    f"({stored['path']}): {difference}"
                )
