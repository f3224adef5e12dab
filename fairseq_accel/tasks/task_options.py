"""Uniform access to a task's options, whichever way fairseq configured the task."""
from typing import Any


class TaskOptionsMixin:
    """Base of the accel task mixins."""

    def task_options(self) -> Any:
        """The dataclass config (``translation``), or the argparse namespace (``speech_to_text``)."""
        return self.cfg if getattr(self, "cfg", None) is not None else self.args
