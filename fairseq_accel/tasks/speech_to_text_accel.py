"""``speech_to_text_accel``: fairseq's ``speech_to_text`` task plus the fast generator options, compression
fine-tuning, and checkpoints that remember their target vocabulary and sentencepiece model."""
from pathlib import Path
from typing import Dict

from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.tasks import register_task
from fairseq.tasks.speech_to_text import SpeechToTextTask

from fairseq_accel.compression.config import CompressionTrainingConfig
from fairseq_accel.tasks.accel_generation import AccelGenerationConfig, AccelGenerationMixin
from fairseq_accel.tasks.compression_training import CompressionTrainingMixin
from fairseq_accel.tasks.vocabulary_check import Vocabulary, VocabularyCheckMixin, sentencepiece_vocabulary


@register_task("speech_to_text_accel")
class SpeechToTextAccelTask(VocabularyCheckMixin, CompressionTrainingMixin, AccelGenerationMixin, SpeechToTextTask):
    """Every ``speech_to_text`` option, plus ``--accel-generator fast`` and its cache options, and compression
    fine-tuning (``--sparsity-*``, ``--admm-*``)."""

    @classmethod
    def add_args(cls, parser) -> None:
        super().add_args(parser)
        gen_parser_from_dataclass(parser.add_argument_group("fast generator (fairseq_accel)"), AccelGenerationConfig())
        gen_parser_from_dataclass(parser.add_argument_group("compression fine-tuning (fairseq_accel)"),
                                  CompressionTrainingConfig())

    def vocabularies(self) -> Dict[str, Vocabulary]:
        """The target vocabulary (the data config's ``vocab_filename``) and, where the data config names
        one (``bpe_tokenizer``), the sentencepiece model that turns its pieces into text."""
        vocab_path = Path(self.args.data) / self.data_cfg.vocab_filename
        found = {"target vocabulary": Vocabulary(vocab_path.as_posix(), list(self.tgt_dict.symbols))}
        bpe = self.data_cfg.bpe_tokenizer or {}
        model_path = bpe.get("sentencepiece_model")
        if bpe.get("bpe") == "sentencepiece" and model_path and Path(model_path).is_file():
            found["sentencepiece model"] = sentencepiece_vocabulary(model_path)
        return found
