"""Sentencepiece models: training, encoding text files, and fairseq dictionaries of their pieces.

One trainer for both uses, with the settings as parameters (:class:`SentencePieceSettings`):

* the NMT recipes (``fairseq-accel-prepare spm train``): a joint BPE model on the training text files,
  normalisation off (``identity``) so that ``fairseq-generate --remove-bpe sentencepiece`` gives back
  exactly the text the references hold; sentencepiece's own special ids (fairseq-preprocess builds the
  dictionary from the encoded text);
* the speech corpora (``fairseq-accel-prepare s2t``): a model on the training transcripts whose special
  ids agree with fairseq's dictionary (:data:`FAIRSEQ_SPECIAL_IDS`), written as a fairseq dictionary by
  :func:`write_fairseq_vocab` for ``--task speech_to_text``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence

import sentencepiece as spm

from fairseq_accel.data.errors import CorpusError
from fairseq_accel.data.text_files import read_utf8_lines

MODEL_TYPES = ("unigram", "bpe", "char", "word")
# fairseq's Dictionary numbers <s>, <pad>, </s>, <unk> 0-3 and adds them itself; a model trained with the
# same ids has piece ids that agree with the dictionary's, and the four are left out of the .txt.
FAIRSEQ_SPECIAL_IDS = {"bos_id": 0, "pad_id": 1, "eos_id": 2, "unk_id": 3}


@dataclass(frozen=True)
class SentencePieceSettings:
    """How :func:`train_sentencepiece` trains (every character of the input is always covered)."""

    model_type: str = "bpe"
    vocab_size: int = 10000  # for char: computed from the sentences when they are given
    normalization: str = "nmt_nfkc"  # sentencepiece's default; "identity" keeps the text as it is
    fairseq_special_ids: bool = False  # number the special pieces as fairseq's Dictionary does
    hard_vocab_limit: bool = True  # False: vocab_size is an upper limit (small corpora)
    threads: int = 1


def _special_ids(settings: SentencePieceSettings) -> Dict[str, int]:
    return dict(FAIRSEQ_SPECIAL_IDS) if settings.fairseq_special_ids else {}


def _char_vocab_size(sentences: Sequence[str], settings: SentencePieceSettings) -> int:
    """Pieces of a char model: every character (spaces become ``▁``) plus the special pieces."""
    return len(set("".join(sentences).replace(" ", "\u2581"))) + len(_special_ids(settings))


def train_sentencepiece(
    prefix: Path,
    settings: SentencePieceSettings,
    *,
    sentences: Optional[Sequence[str]] = None,
    files: Optional[Sequence[Path]] = None,
) -> Path:
    """Train ``<prefix>.model`` and ``<prefix>.vocab`` on ``sentences`` or on the lines of ``files``
    (exactly one of them); return the path of the ``.model``.

    Raises :class:`CorpusError` for missing input files and for settings sentencepiece rejects (e.g. a
    vocabulary larger than the text allows).
    """
    if (sentences is None) == (files is None):
        raise ValueError("train_sentencepiece takes either sentences or files")
    if settings.model_type not in MODEL_TYPES:
        raise CorpusError(f"unknown sentencepiece model type '{settings.model_type}'; choose one of "
                          f"{', '.join(MODEL_TYPES)}")
    if files is not None:
        missing = [str(path) for path in files if not Path(path).is_file()]
        if missing:
            raise CorpusError(f"sentencepiece training text not found: {', '.join(missing)}")
        source = {"input": [str(path) for path in files]}
        what = f"the lines of {', '.join(str(path) for path in files)}"
    else:
        source = {"sentence_iterator": iter(sentences)}
        what = f"{len(sentences)} sentences"
    vocab_size = settings.vocab_size
    if settings.model_type == "char" and sentences is not None:
        vocab_size = _char_vocab_size(sentences, settings)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    try:
        spm.SentencePieceTrainer.train(
            **source,
            model_prefix=str(prefix),
            model_type=settings.model_type,
            vocab_size=vocab_size,
            character_coverage=1.0,
            normalization_rule_name=settings.normalization,
            hard_vocab_limit=settings.hard_vocab_limit,
            num_threads=settings.threads,
            minloglevel=2,
            **_special_ids(settings),
        )
    except RuntimeError as err:
        raise CorpusError(
            f"sentencepiece cannot train a {settings.model_type} model of {vocab_size} pieces on {what}: "
            f"{str(err).split('] ')[-1]}"
        ) from None
    return Path(f"{prefix}.model")


def load_model(model_path: Path) -> spm.SentencePieceProcessor:
    """The sentencepiece model at ``model_path``; :class:`CorpusError` if it is missing or unreadable."""
    if not Path(model_path).is_file():
        raise CorpusError(f"sentencepiece model {model_path} not found")
    try:
        return spm.SentencePieceProcessor(model_file=str(model_path))
    except (RuntimeError, OSError) as err:
        raise CorpusError(f"{model_path} is not a sentencepiece model: {err}") from None


def encode_file(model_path: Path, input_path: Path, output_path: Path) -> int:
    """Write the pieces of every line of ``input_path`` to ``output_path``, space-separated (``▁`` marks
    a word start); return the number of lines. Only ``\\n`` ends a line."""
    model = load_model(model_path)
    if not Path(input_path).is_file():
        raise CorpusError(f"input text {input_path} not found")
    lines = read_utf8_lines(input_path)
    pieces = model.encode(lines, out_type=str)
    Path(output_path).parent.mkdir(parents=True, exist_ok=True)
    Path(output_path).write_text("".join(" ".join(line) + "\n" for line in pieces), encoding="utf-8")
    return len(lines)


def write_fairseq_vocab(model_path: Path, vocab_path: Path) -> int:
    """Write the pieces of a model trained with :data:`FAIRSEQ_SPECIAL_IDS` as a fairseq dictionary
    (``<piece> 1`` lines in id order, without the four special symbols fairseq adds itself); return the
    number of lines."""
    model = load_model(model_path)
    special = {model.id_to_piece(i) for i in FAIRSEQ_SPECIAL_IDS.values()}
    pieces = [model.id_to_piece(i) for i in range(model.get_piece_size())]
    lines = [f"{piece} 1\n" for piece in pieces if piece not in special]
    Path(vocab_path).write_text("".join(lines), encoding="utf-8")
    return len(lines)
