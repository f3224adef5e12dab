"""The metrics users report for decoded output, computed the way the recipes compute them: BLEU (sacrebleu,
13a tokenization, on detokenized text), WER over words and CER over characters without spaces (the mini ASR
recipe's egs/tools/asr_results.py), all in percent. Shared by ``fairseq-accel-benchmark`` and by
``fairseq-accel-compress``'s mixed precision, which measures each layer's damage in the same units."""
from __future__ import annotations

import argparse
from typing import Callable, Optional, Sequence

import editdistance
from torch import Tensor

METRICS = ("bleu", "wer", "cer")
ERROR_RATES = ("wer", "cer")  # lower is better


class PostProcessingError(ValueError):
    """Post-processing that would score other text than the task's own decoding, said in one line."""


def token_decoder(task, remove_bpe: Optional[str]) -> Callable[[Tensor], str]:
    """Target token ids to the text that is scored: the dictionary's string without ``</s>`` and padding,
    ``remove_bpe`` undone (as fairseq-generate's ``--post-process``), and a speech task's own BPE decoded.
    ``remove_bpe`` on top of a speech task's own BPE is a :class:`PostProcessingError`."""
    speech = hasattr(task, "data_cfg")
    if speech and remove_bpe and task.data_cfg.bpe_tokenizer is not None:
        raise PostProcessingError(f"--remove-bpe {remove_bpe}: the speech task decodes the units with its data "
                                  f"config's bpe_tokenizer itself (undoing them twice joins the words): leave it out")
    tgt_dict = task.target_dictionary
    bpe = task.build_bpe(argparse.Namespace(bpe=None)) if speech else None

    def to_text(tokens: Tensor) -> str:
        tokens = tokens[tokens.ne(tgt_dict.pad())].int().cpu()
        text = tgt_dict.string(tokens, remove_bpe, extra_symbols_to_ignore={tgt_dict.eos()})
        return bpe.decode(text) if bpe is not None else text

    return to_text


def _error_rate(references: Sequence[Sequence[str]], hypotheses: Sequence[Sequence[str]]) -> float:
    length = sum(len(reference) for reference in references)
    errors = sum(editdistance.eval(list(hyp), list(ref)) for ref, hyp in zip(references, hypotheses))
    return 100.0 * errors / max(length, 1)


def corpus_score(metric: str, references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """``metric`` (one of :data:`METRICS`) of ``hypotheses`` against ``references``, in percent."""
    if metric == "bleu":
        import sacrebleu

        return sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score
    if metric == "wer":
        return _error_rate([r.split() for r in references], [h.split() for h in hypotheses])
    if metric == "cer":
        return _error_rate([r.replace(" ", "") for r in references], [h.replace(" ", "") for h in hypotheses])
    raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
