"""``translation_accel``: fairseq's ``translation`` task plus the fast generator options, compression
fine-tuning, and checkpoints that remember their dictionaries."""
import os
from dataclasses import dataclass
from typing import Dict

from fairseq import utils
from fairseq.tasks import register_task
from fairseq.tasks.translation import TranslationConfig, TranslationTask

from fairseq_accel.compression.config import CompressionTrainingConfig
from fairseq_accel.tasks.accel_generation import AccelGenerationConfig, AccelGenerationMixin
from fairseq_accel.tasks.compression_training import CompressionTrainingMixin
from fairseq_accel.tasks.vocabulary_check import Vocabulary, VocabularyCheckMixin


@dataclass
class TranslationAccelConfig(TranslationConfig, AccelGenerationConfig, CompressionTrainingConfig):
    pass


@register_task("translation_accel", dataclass=TranslationAccelConfig)
class TranslationAccelTask(VocabularyCheckMixin, CompressionTrainingMixin, AccelGenerationMixin, TranslationTask):
    """Every ``translation`` option, plus ``--accel-generator fast`` and its cache options, and compression
    fine-tuning (``--sparsity-*``, ``--admm-*``)."""

    def vocabularies(self) -> Dict[str, Vocabulary]:
        """Source and target dictionaries, from ``dict.<lang>.txt`` of the first data folder (as
        ``TranslationTask.setup_task`` reads them)."""
        folder = utils.split_paths(self.cfg.data)[0]
        return {
            f"{side} dictionary": Vocabulary(os.path.join(folder, f"dict.{lang}.txt"), list(dictionary.symbols))
            for side, lang, dictionary in (
                ("source", self.cfg.source_lang, self.src_dict), ("target", self.cfg.target_lang, self.tgt_dict)
            )
        }
