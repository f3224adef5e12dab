"""``translation_accel``: fairseq's ``translation`` task plus the fast generator options."""
from dataclasses import dataclass

from fairseq.tasks import register_task
from fairseq.tasks.translation import TranslationConfig, TranslationTask

from fairseq_accel.tasks.accel_generation import AccelGenerationConfig, AccelGenerationMixin


@dataclass
class TranslationAccelConfig(TranslationConfig, AccelGenerationConfig):
    pass


@register_task("translation_accel", dataclass=TranslationAccelConfig)
class TranslationAccelTask(AccelGenerationMixin, TranslationTask):
    """Every ``translation`` option, plus ``--accel-generator fast`` and its cache options."""
