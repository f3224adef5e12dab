"""Tasks: thin extensions of fairseq's translation and speech_to_text tasks."""
from fairseq_accel.tasks import speech_to_text_accel, translation_accel  # noqa: F401  (registers the tasks)
