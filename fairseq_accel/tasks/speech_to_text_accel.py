"""``speech_to_text_accel``: fairseq's ``speech_to_text`` task plus the fast generator options."""
from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.tasks import register_task
from fairseq.tasks.speech_to_text import SpeechToTextTask

from fairseq_accel.tasks.accel_generation import AccelGenerationConfig, AccelGenerationMixin


@register_task("speech_to_text_accel")
class SpeechToTextAccelTask(AccelGenerationMixin, SpeechToTextTask):
    """Every ``speech_to_text`` option, plus ``--accel-generator fast`` and its cache options."""

    @classmethod
    def add_args(cls, parser) -> None:
        super().add_args(parser)
        gen_parser_from_dataclass(parser.add_argument_group("fast generator (fairseq_accel)"), AccelGenerationConfig())
