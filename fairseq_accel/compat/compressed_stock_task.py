"""A compressed checkpoint decoded by a stock task says so.

``fairseq-generate --user-dir user_dir --task translation --path compressed.pt`` loads the checkpoint's weights
expanded to float32 (the plugin's loader does that for any task), but only the accel tasks
(``translation_accel``, ``speech_to_text_accel``) run its int8 layers: a stock task would decode in float32 and
nothing would tell the user why the int8 speed never shows. :func:`install` makes the stock task's
``load_state_dict`` (which receives the checkpoint's ``task_state``, where the compressed section travels) log
one warning naming the task to use, and leave the section out of its state. The accel tasks take the section
before this point and never reach it.
"""
import logging
from typing import Any, Dict

from fairseq.tasks.fairseq_task import FairseqTask

from fairseq_accel.compat.checkpoint_files import COMPRESSED_KEY

logger = logging.getLogger(__name__)
_WRAPPED_MARK = "__fairseq_accel_compressed_notice__"


def install() -> None:
    original = FairseqTask.load_state_dict
    if getattr(original, _WRAPPED_MARK, False):
        return

    def load_state_dict(self: FairseqTask, state_dict: Dict[str, Any]) -> None:
        if COMPRESSED_KEY in state_dict:
            state_dict = {key: value for key, value in state_dict.items() if key != COMPRESSED_KEY}
            logger.warning(f"a compressed checkpoint (fairseq-accel-compress) under the stock task "
                           f"{type(self).__name__}: its weights run expanded to float32; --task translation_accel "
                           "(speech: speech_to_text_accel) runs its int8 layers")
        original(self, state_dict)

    setattr(load_state_dict, _WRAPPED_MARK, True)
    FairseqTask.load_state_dict = load_state_dict
