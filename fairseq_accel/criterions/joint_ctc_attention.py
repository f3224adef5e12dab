"""Joint CTC/attention training: ``(1 - λ)·label-smoothed CE + λ·CTC`` (criterion ``joint_ctc_attention``).

Hybrid CTC/attention (Watanabe et al. 2017, "Hybrid CTC/Attention Architecture for End-to-End Speech
Recognition", IEEE JSTSP) trains the attention decoder together with a CTC head on the encoder output;
the CTC branch enforces monotonic alignments and speeds up convergence. ``--ctc-weight`` is λ
(ESPnet's ``mtlalpha``; its default, 0.3, is ours).

Where the CTC head lives. fairseq 0.12 would train and save parameters owned by a criterion (the
Trainer optimizes ``model.parameters()`` and ``criterion.parameters()`` and checkpoints both), but a
criterion is built from the task alone, before it sees the model, and the optimizer is built before the
first forward: the encoder width is unknown while the head could still be created. fairseq 0.12's own
``s2t_transformer`` already solves this on the model side: its encoder builds ``encoder.ctc_proj`` when
``args.ctc_weight > 0``, and fairseq-train passes the criterion's ``--ctc-weight`` to models configured
through ``add_args`` and stores it in the checkpoint's model config. So the head is a model parameter
(optimized, saved in ``model``), and ``fairseq-generate`` rebuilds the stock model *with* the head from
the checkpoint and loads it strictly; no key is dropped and no model class is changed. The plugin's
``s2t_sanm`` and ``s2t_lite_transformer`` follow the same contract (:mod:`fairseq_accel.models.ctc_head`).
A model without such a head gets one clear error at the first batch.

The math lives in module-level functions (tested directly); the criterion class only wires them.
"""

import argparse
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import editdistance
import torch
import torch.nn.functional as F
from fairseq import utils
from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
)
from fairseq.data import Dictionary
from fairseq.logging import metrics
from torch import Tensor

from fairseq_accel.models.ctc_head import ctc_best_paths, ctc_log_probs, encoder_out_of, find_ctc_head


# --------------------------------------------------------------------------------------------
# Loss math.
# --------------------------------------------------------------------------------------------
def check_ctc_weight(ctc_weight: float) -> float:
    """Return ``ctc_weight`` if it lies in [0, 1]; else raise one ValueError saying so."""
    if not 0.0 <= ctc_weight <= 1.0:
        raise ValueError(
            f"--ctc-weight must be in [0, 1] (0: attention only, 1: CTC only), got {ctc_weight}"
        )
    return ctc_weight


def ctc_targets(target: Tensor, pad: int, eos: int) -> Tuple[Tensor, Tensor]:
    """Padded decoder targets (B x S) -> CTC labels: all non-pad, non-EOS tokens concatenated, and
    their count per sentence (B,). The decoder predicts EOS; CTC has no end symbol."""
    keep = target.ne(pad) & target.ne(eos)
    return target.masked_select(keep), keep.sum(dim=-1)


def ctc_loss_sum(
    lprobs: Tensor,
    input_lengths: Tensor,
    targets: Tensor,
    target_lengths: Tensor,
    blank: int,
    zero_infinity: bool = True,
) -> Tensor:
    """CTC negative log-likelihood summed over the batch (not divided by target lengths, unlike
    ``F.ctc_loss``'s "mean"), so that it is normalized by the same sample size as the CE sum.

    ``lprobs``: T x B x V log-probabilities; ``targets``: concatenated labels (see :func:`ctc_targets`).
    ``zero_infinity`` zeroes sentences too long for their frames instead of returning inf.
    """
    # cuDNN's CTC only takes int32 lengths and short targets; fairseq's ctc criterion disables it too.
    with torch.backends.cudnn.flags(enabled=False):
        return F.ctc_loss(
            lprobs,
            targets,
            input_lengths,
            target_lengths,
            blank=blank,
            reduction="sum",
            zero_infinity=zero_infinity,
        )


def joint_ctc_attention_loss(ce_loss: Tensor, ctc_loss: Optional[Tensor], ctc_weight: float) -> Tensor:
    """``(1 - λ)·ce_loss + λ·ctc_loss``; with λ = 0 there is no CTC term (``ctc_loss`` may be None).

    With λ = 1 the CE term is kept at weight 0, so the decoder stays in the graph (its gradients are
    zero, not missing) and distributed training does not see unused parameters.
    """
    check_ctc_weight(ctc_weight)
    if ctc_weight == 0.0:
        return ce_loss
    if ctc_loss is None:
        raise ValueError(f"a CTC loss is needed for --ctc-weight {ctc_weight}")
    return (1.0 - ctc_weight) * ce_loss + ctc_weight * ctc_loss


# --------------------------------------------------------------------------------------------
# Error counts of the CTC greedy hypotheses (validation only).
# --------------------------------------------------------------------------------------------
class ErrorCounts(NamedTuple):
    """Edit distances and reference sizes of one hypothesis against its reference."""

    word_errors: int
    words: int
    char_errors: int
    chars: int


def count_errors(hypothesis: str, reference: str) -> ErrorCounts:
    """Word and character edit distances (Levenshtein); characters exclude whitespace (as ESPnet's CER)."""
    hyp_words, ref_words = hypothesis.split(), reference.split()
    hyp_chars, ref_chars = "".join(hyp_words), "".join(ref_words)
    return ErrorCounts(
        word_errors=editdistance.eval(hyp_words, ref_words),
        words=len(ref_words),
        char_errors=editdistance.eval(hyp_chars, ref_chars),
        chars=len(ref_chars),
    )


def build_text_decoder(
    dictionary: Dictionary,
    post_process: Optional[str] = None,
    bpe: Optional[Any] = None,
    tokenizer: Optional[Any] = None,
) -> Callable[[Sequence[int]], str]:
    """Token ids -> text as fairseq-generate prints it: ``dictionary.string(ids, post_process)`` (EOS
    and BOS dropped; ``post_process`` is fairseq's ``--post-process``: sentencepiece, letter, ...), then
    the subword model's and the pre-tokenizer's ``decode``."""

    def decode(ids: Sequence[int]) -> str:
        text = dictionary.string(torch.as_tensor(ids, dtype=torch.long), post_process)
        if bpe is not None:
            text = bpe.decode(text)
        if tokenizer is not None:
            text = tokenizer.decode(text)
        return text

    return decode


def task_text_decoder(task: Any, post_process: Optional[str]) -> Callable[[Sequence[int]], str]:
    """:func:`build_text_decoder` for a task: a speech_to_text task's ``data_cfg`` gives the subword
    model (``bpe_tokenizer``, e.g. sentencepiece) and pre-tokenizer that made its targets."""
    bpe = tokenizer = None
    if getattr(task, "data_cfg", None) is not None:
        bpe, tokenizer = task.build_bpe(None), task.build_tokenizer(None)
    return build_text_decoder(task.target_dictionary, post_process, bpe, tokenizer)


# --------------------------------------------------------------------------------------------
# The criterion.
# --------------------------------------------------------------------------------------------
def _parse_bool(value: str) -> bool:
    """argparse type for an explicit boolean value (true/false, yes/no, 1/0)."""
    lowered = value.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


@dataclass
class JointCTCAttentionCriterionConfig(LabelSmoothedCrossEntropyCriterionConfig):
    label_smoothing: float = field(
        default=0.1, metadata={"help": "epsilon for label smoothing of the decoder CE, 0 means none"}
    )
    ctc_weight: float = field(
        default=0.3,
        metadata={
            "help": "λ in (1 - λ)·CE + λ·CTC, in [0, 1] (Watanabe et al. 2017; ESPnet's mtlalpha). A "
            "model builds its CTC head (encoder.ctc_proj) only when this is > 0"
        },
    )
    ctc_zero_infinity: bool = field(
        default=True,
        metadata={"help": "zero the CTC loss of sentences with more labels than frames instead of inf"},
    )
    post_process: Optional[str] = field(
        default=None,
        metadata={
            "help": "how validation turns CTC tokens into words for ctc_wer/ctc_cer (fairseq's "
            "--post-process: sentencepiece, letter, subword_nmt, ...); speech_to_text tasks also "
            "decode with the subword model of their data config"
        },
    )


@register_criterion("joint_ctc_attention", dataclass=JointCTCAttentionCriterionConfig)
class JointCTCAttentionCriterion(LabelSmoothedCrossEntropyCriterion):
    """``(1 - λ)·`` label-smoothed CE of the decoder ``+ λ·`` CTC of the encoder's CTC head.

    ``sample_size`` is ``ntokens`` (target tokens including EOS), or the number of sentences with
    ``--sentence-avg``. Both losses are sums over the batch divided by that same number, so λ weighs
    them exactly as written. Logged: ``loss``, ``ce_loss`` (label-smoothed CE), ``ctc_loss`` (per
    ``sample_size``, in base 2 like fairseq's losses), ``nll_loss`` (per token), and on validation the
    CTC greedy-decoding ``ctc_wer`` and ``ctc_cer`` in percent.
    """

    def __init__(
        self,
        task: Any,
        sentence_avg: bool,
        label_smoothing: float,
        ignore_prefix_size: int = 0,
        report_accuracy: bool = False,
        ctc_weight: float = 0.3,
        ctc_zero_infinity: bool = True,
        post_process: Optional[str] = None,
    ) -> None:
        super().__init__(task, sentence_avg, label_smoothing, ignore_prefix_size, report_accuracy)
        self.ctc_weight = check_ctc_weight(ctc_weight)
        self.ctc_zero_infinity = ctc_zero_infinity
        self.post_process = post_process
        self.eos_idx = task.target_dictionary.eos()
        self.blank_idx = task.target_dictionary.bos()
        self._decode_text: Optional[Callable[[Sequence[int]], str]] = None

    @classmethod
    def add_args(cls, parser: argparse.ArgumentParser) -> None:
        # fairseq turns a bool field that defaults to True into a store_false flag, so that
        # `--ctc-zero-infinity` would switch it off; take an optional explicit value instead.
        parser.add_argument(
            "--ctc-zero-infinity", type=_parse_bool, nargs="?", const=True, default=True, metavar="BOOL",
            help="zero the CTC loss of sentences with more labels than frames instead of inf "
            "(true/false; default true)",
        )
        super().add_args(parser)  # fairseq skips the dataclass's duplicate of the flag above

    def forward(
        self, model: Any, sample: Dict[str, Any], reduce: bool = True
    ) -> Tuple[Tensor, int, Dict[str, Any]]:
        """Return (loss, sample_size, logging_output) for one batch; ``loss`` is the weighted sum
        over the batch, which the trainer divides by ``sample_size``."""
        if not reduce:
            raise ValueError("joint_ctc_attention only computes batch sums (reduce=True)")
        return self.task_loss(model, model(**sample["net_input"]), sample)

    def task_loss(
        self, model: Any, net_output: Any, sample: Dict[str, Any]
    ) -> Tuple[Tensor, int, Dict[str, Any]]:
        """What :meth:`forward` returns, for a forward pass already run (a subclass adds to it)."""
        ce_loss, nll_loss = self.compute_loss(model, net_output, sample, reduce=True)
        ctc_loss = None
        if self.ctc_weight > 0.0:
            lprobs, lengths = ctc_log_probs(find_ctc_head(model), encoder_out_of(net_output))
            target = sample["target"][:, self.ignore_prefix_size:]
            labels, label_lengths = ctc_targets(target, self.padding_idx, self.eos_idx)
            ctc_loss = ctc_loss_sum(
                lprobs, lengths, labels, label_lengths, self.blank_idx, self.ctc_zero_infinity
            )
        loss = joint_ctc_attention_loss(ce_loss, ctc_loss, self.ctc_weight)

        sample_size = sample["target"].size(0) if self.sentence_avg else sample["ntokens"]
        logging_output = {
            "loss": loss.data,
            "ce_loss": ce_loss.data,
            "nll_loss": nll_loss.data,
            "ntokens": sample["ntokens"],
            "nsentences": sample["target"].size(0),
            "sample_size": sample_size,
        }
        if ctc_loss is not None:
            logging_output["ctc_loss"] = ctc_loss.data
            if not model.training:
                logging_output.update(self._ctc_error_counts(lprobs, lengths, target))
        if self.report_accuracy:
            n_correct, total = self.compute_accuracy(model, net_output, sample)
            logging_output["n_correct"] = utils.item(n_correct.data)
            logging_output["total"] = utils.item(total.data)
        return loss, sample_size, logging_output

    def _ctc_error_counts(self, lprobs: Tensor, lengths: Tensor, target: Tensor) -> Dict[str, int]:
        """Summed word/char errors of the CTC greedy hypotheses against the detokenized references."""
        if self._decode_text is None:
            self._decode_text = task_text_decoder(self.task, self.post_process)
        totals = ErrorCounts(0, 0, 0, 0)
        paths = ctc_best_paths(lprobs, lengths, self.blank_idx)
        for (hypothesis, _), reference in zip(paths, target.cpu()):
            reference = utils.strip_pad(reference, self.padding_idx)
            counts = count_errors(self._decode_text(hypothesis), self._decode_text(reference))
            totals = ErrorCounts(*(a + b for a, b in zip(totals, counts)))
        return {
            "ctc_word_errors": totals.word_errors,
            "ctc_words": totals.words,
            "ctc_char_errors": totals.char_errors,
            "ctc_chars": totals.chars,
        }

    @classmethod
    def reduce_metrics(cls, logging_outputs: List[Dict[str, Any]]) -> None:
        """Aggregate logging outputs (summed over workers) into the logged metrics."""
        super().reduce_metrics(logging_outputs)
        sample_size = sum(log.get("sample_size", 0) for log in logging_outputs)
        for key in ("ce_loss", "ctc_loss"):
            if any(key in log for log in logging_outputs):
                total = sum(log.get(key, 0) for log in logging_outputs)
                metrics.log_scalar(key, total / sample_size / math.log(2), sample_size, round=3)
        rates = (("ctc_wer", "ctc_word_errors", "ctc_words"), ("ctc_cer", "ctc_char_errors", "ctc_chars"))
        for name, errors, size in rates:
            if any(errors in log for log in logging_outputs):
                metrics.log_scalar(f"_{errors}", sum(log.get(errors, 0) for log in logging_outputs))
                metrics.log_scalar(f"_{size}", sum(log.get(size, 0) for log in logging_outputs))
                metrics.log_derived(name, _error_rate(f"_{errors}", f"_{size}"))


def _error_rate(errors: str, size: str) -> Callable[[Dict[str, Any]], float]:
    """A derived metric: 100 · errors / size over the aggregated meters (nan when size is 0)."""

    def rate(meters: Dict[str, Any]) -> float:
        total = meters[size].sum
        return round(meters[errors].sum * 100.0 / total, 3) if total > 0 else float("nan")

    return rate
