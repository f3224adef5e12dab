"""What mixed precision measures a quantized layer's damage by, as a cost (lower is better) of the model as it is
now: the teacher-forced dev loss (fast, every model), or the metric users report, decoded through the real
generator: BLEU by beam search, WER or CER by the CTC head's best path where the model has one (what the
speech recipes decode with) and by beam search otherwise. The loss misses what only decoding shows, e.g. a
speech model decoded by its CTC head, whose decoder loss does not see the CTC branch at all."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence

import torch
from fairseq.dataclass.configs import GenerationConfig
from torch import nn

from fairseq_accel.compression.activation_calibration import teacher_forced_forward
from fairseq_accel.compression.calibration import CalibrationError
from fairseq_accel.decoding_metrics import ERROR_RATES, METRICS, corpus_score, token_decoder
from fairseq_accel.inference.ctc_generator import CTCGreedyGenerator

SENSITIVITY_METRICS = ("loss", *METRICS)


@dataclass
class SensitivityMeasure:
    """``cost()``: the model's current cost (loss, -BLEU, WER or CER); a rise of it is the damage. ``unit``
    names the rise in tables and messages."""

    metric: str
    unit: str
    cost: Callable[[], float]

    def shown(self, cost: float) -> float:
        """The metric's own value (BLEU is positive) of a cost."""
        return -cost if self.metric == "bleu" else cost


def teacher_forced_loss(model: nn.Module, batches: Sequence[Dict], pad: int) -> float:
    """Mean negative log-likelihood per target token of ``batches`` (fairseq samples)."""
    total, tokens = 0.0, 0
    with torch.no_grad():
        for sample in batches:
            log_probs = model.get_normalized_probs(teacher_forced_forward(model, sample["net_input"]), log_probs=True)
            target = sample["target"]
            keep = target.ne(pad)
            total -= float(log_probs.gather(-1, target.unsqueeze(-1)).squeeze(-1)[keep].sum())
            tokens += int(keep.sum())
    if tokens == 0:
        raise CalibrationError("the sensitivity set has no target tokens (check --sensitivity-subset)")
    return total / tokens


def _generator(model: nn.Module, task, metric: str, beam: int):
    """CTC best path for an error rate of a model with a CTC head, else the task's beam search."""
    if metric in ERROR_RATES and getattr(getattr(model, "encoder", None), "ctc_proj", None) is not None:
        return CTCGreedyGenerator(model, task.target_dictionary)
    return task.build_generator([model], GenerationConfig(beam=beam))


def decoded_metric(model: nn.Module, task, batches: Sequence[Dict], metric: str, beam: int,
                   remove_bpe: Optional[str]) -> float:
    """``metric`` of the model's hypotheses for ``batches`` (the generator of :func:`_generator`, built for
    every probe: a generator keeps references to the modules it runs, e.g. the CTC head, which a probe swaps)."""
    generator = _generator(model, task, metric, beam)
    to_text = token_decoder(task, remove_bpe)
    references, hypotheses = [], []
    with torch.no_grad():
        for sample in batches:
            for target, hypos in zip(sample["target"], task.inference_step(generator, [model], sample)):
                references.append(to_text(target))
                hypotheses.append(to_text(hypos[0]["tokens"]))
    if not references:
        raise CalibrationError("the sensitivity set has no sentences (check --sensitivity-subset)")
    return corpus_score(metric, references, hypotheses)


def sensitivity_measure(metric: str, model: nn.Module, task, batches: Sequence[Dict], beam: int = 5,
                        remove_bpe: Optional[str] = None) -> SensitivityMeasure:
    """The measure ``metric`` (one of :data:`SENSITIVITY_METRICS`) of ``model`` on ``batches``."""
    if metric == "loss":
        pad = task.target_dictionary.pad()
        return SensitivityMeasure("loss", "nats", lambda: teacher_forced_loss(model, batches, pad))
    if metric not in METRICS:
        raise ValueError(f"sensitivity metric must be one of {SENSITIVITY_METRICS}, got {metric!r}")
    sign = -1.0 if metric == "bleu" else 1.0  # BLEU: higher is better
    return SensitivityMeasure(metric, f"{metric.upper()} points",
                              lambda: sign * decoded_metric(model, task, batches, metric, beam, remove_bpe))
