"""Knowledge distillation from a frozen teacher (criterion ``minilm_distillation``).

The student's task loss (label-smoothed CE; with ``--ctc-weight`` > 0 the joint CTC/attention loss of
:mod:`~fairseq_accel.criterions.joint_ctc_attention`) plus, each with its own weight:

* word-level KD (``--kd-weight``): KL(teacher ‖ student) of the output distributions at temperature τ,
  times τ², summed over target tokens like the CE (Hinton et al. 2015, arXiv 1503.02531; Kim & Rush 2016,
  arXiv 1606.07947, "word-level").
* attention transfer L_AT (``--attention-weight``) and value relation L_VR (``--value-relation-weight``)
  of one self-attention layer of teacher and student, by default the last (MiniLM, Wang et al. 2020,
  arXiv 2002.10957, Eq. 4-6): KL per head and query position between softmax(QKᵀ/√d_k) of the two, and
  between softmax(VVᵀ/√d_k), averaged over heads and positions. Neither needs equal widths, only equal
  head counts. With other head counts (or ``--relation-heads``), the multi-head self-attention relations
  of MiniLMv2 (Wang et al. 2021, arXiv 2012.15828, Eq. 4-6) are used instead: Q, K and V of all heads
  are concatenated and re-split into R relation heads, L_AT is the mean of the Q-Q and K-K relation KLs and
  L_VR the V-V relation KL.
* CTC KD (``--ctc-kd-weight``, speech students trained with ``--ctc-weight`` > 0 and a teacher with a CTC
  head): KL(teacher ‖ student) of the CTC heads' posteriors per encoder frame, averaged over valid frames
  (frame-level KD of CTC models, Takashima et al. 2018, ICASSP, "An investigation of a knowledge distillation
  method for CTC acoustic models"). Word-level KD teaches the attention decoder only; where the student is
  decoded by its CTC head, this is the term that reaches what is decoded (measured on the mini ASR recipe:
  egs/mini_espeak/asr/RESULTS.md). Frames must line up (the same front-end subsampling).
* LSRA convolution attention transfer (``--conv-attention-weight``): a softmax-normalised lightweight or
  dynamic convolution is an attention whose distribution is confined to a K-tap window (Wu et al. 2019,
  arXiv 1901.10430, Sec. 3); the teacher's attention distribution of the same layer (mean over its
  heads), restricted to that window and renormalised, is the target of each conv head's kernel (KL per
  head and position). This is attention transfer (Zagoruyko & Komodakis 2017, arXiv 1612.03928) from
  the teacher's attention into the branch that has no attention map of its own: it teaches the
  convolution the local part of what the teacher attends to.

Which attention: ``--distill-side encoder`` (the default; MiniLM distils an encoder's self-attention, and
every supported model has encoder self-attention), ``decoder`` (causal self-attention of the decoder;
SAN-M decoders have none: an FSMN) or ``both`` (the mean of the two sides). The layers are
``--teacher-layer`` and ``--student-layer`` (default -1, the last). Layers are found and checked at the
first batch for the student and when the criterion is built for the teacher; positions must line up
(same source tokens, or the same speech subsampling).

The math lives in module-level functions (tested directly); the criterion only wires them.
"""
import contextlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from fairseq.criterions import register_criterion
from fairseq.dataclass import ChoiceEnum
from fairseq.logging import metrics
from torch import Tensor

from fairseq_accel.criterions.attention_capture import (
    SIDES,
    AttentionView,
    ConvView,
    DistillationSetupError,
    LayerTap,
    attention_heads,
)
from fairseq_accel.criterions.frozen_teacher import FrozenTeacher, load_teacher
from fairseq_accel.criterions.joint_ctc_attention import (
    JointCTCAttentionCriterion,
    JointCTCAttentionCriterionConfig,
)
from fairseq_accel.models.ctc_head import CTCHeadError, ctc_log_probs, encoder_out_of, find_ctc_head

logger = logging.getLogger(__name__)

#: logged distillation terms, in nats: ``kd_loss`` per target token, ``ctc_kd_loss`` per frame, the others per
#: head and position
TERMS = ("kd_loss", "at_loss", "vr_loss", "conv_at_loss", "ctc_kd_loss")


# --------------------------------------------------------------------------------------------
# Loss math.
# --------------------------------------------------------------------------------------------
def masked_log_softmax(scores: Tensor, allowed: Tensor) -> Tensor:
    """log softmax over the last axis where ``allowed``; -inf elsewhere."""
    return torch.log_softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)


def row_kl(teacher_log: Tensor, student_log: Tensor, allowed: Tensor) -> Tensor:
    """KL(teacher ‖ student) of each row (last axis) of two log-distributions; disallowed entries add 0."""
    terms = teacher_log.exp() * (teacher_log - student_log)
    return torch.where(allowed, terms, torch.zeros_like(terms)).sum(dim=-1)


def mean_over_positions(kl: Tensor, valid: Tensor) -> Tensor:
    """Mean of (batch, heads, time) row KLs over heads and valid (batch, time) query positions."""
    weights = valid.unsqueeze(1).to(kl.dtype).expand_as(kl)
    return (kl * weights).sum() / weights.sum().clamp_min(1.0)


def relation_log_probs(x: Tensor, allowed: Tensor) -> Tensor:
    """log softmax(x xᵀ/√d) per head of (batch, heads, time, d) ``x`` (MiniLM's scaled dot-product
    relation; with x=Q, y=K it is the attention distribution, see :func:`attention_log_probs`)."""
    return masked_log_softmax(x @ x.transpose(-1, -2) / math.sqrt(x.size(-1)), allowed)


def attention_log_probs(view: AttentionView) -> Tensor:
    """log softmax(QKᵀ/√d_k) per head: the layer's attention distributions (without dropout)."""
    return masked_log_softmax(view.q @ view.k.transpose(-1, -2) / math.sqrt(view.q.size(-1)), view.allowed)


def relation_heads_of(x: Tensor, heads: int) -> Tensor:
    """Concatenate the heads of (batch, H, time, d) ``x`` and split them into ``heads`` relation heads
    (MiniLMv2): (batch, heads, time, H·d / heads)."""
    batch, old_heads, time, dim = x.shape
    width = old_heads * dim
    if width % heads:
        raise DistillationSetupError(
            f"{heads} relation heads (--relation-heads; default: the teacher's head count) do not divide the "
            f"attention width {width}: set --relation-heads to a common divisor of both models' widths"
        )
    concatenated = x.transpose(1, 2).reshape(batch, time, width)
    return concatenated.view(batch, time, heads, width // heads).transpose(1, 2)


def relation_kl(teacher: Tensor, student: Tensor, allowed: Tensor, valid: Tensor) -> Tensor:
    """Mean KL over heads and positions between the scaled dot-product relations of two (batch, heads,
    time, d) tensors (widths d may differ)."""
    kl = row_kl(relation_log_probs(teacher, allowed), relation_log_probs(student, allowed), allowed)
    return mean_over_positions(kl, valid)


def check_aligned(teacher: AttentionView, student: AttentionView) -> None:
    """Teacher and student must attend over the same positions (same length and padding)."""
    if teacher.allowed.shape != student.allowed.shape or not torch.equal(teacher.valid, student.valid):
        raise DistillationSetupError(
            f"teacher and student layers see different positions (teacher {tuple(teacher.valid.shape)}, student "
            f"{tuple(student.valid.shape)} batch x time, or other padding): attention terms need the same "
            "inputs (for speech models: the same front-end subsampling)"
        )


def minilm_losses(
    teacher: AttentionView, student: AttentionView, relation_heads: Optional[int] = None
) -> Tuple[Tensor, Tensor]:
    """(L_AT, L_VR) between two self-attention layers, each a mean KL(teacher ‖ student) per head and
    position. Equal head counts and no ``relation_heads``: MiniLM (attention distributions, V-V relation);
    otherwise MiniLMv2 relations over ``relation_heads`` (default: the teacher's head count)."""
    check_aligned(teacher, student)
    allowed, valid = student.allowed, student.valid
    if relation_heads is None and teacher.q.size(1) == student.q.size(1):
        kl = row_kl(attention_log_probs(teacher), attention_log_probs(student), allowed)
        return mean_over_positions(kl, valid), relation_kl(teacher.v, student.v, allowed, valid)
    heads = relation_heads or teacher.q.size(1)
    tq, tk, tv = (relation_heads_of(x, heads) for x in (teacher.q, teacher.k, teacher.v))
    sq, sk, sv = (relation_heads_of(x, heads) for x in (student.q, student.k, student.v))
    attention = (relation_kl(tq, sq, allowed, valid) + relation_kl(tk, sk, allowed, valid)) / 2
    return attention, relation_kl(tv, sv, allowed, valid)


def word_kd_loss(teacher_logits: Tensor, student_logits: Tensor, keep: Tensor, temperature: float) -> Tensor:
    """Σ over target tokens where ``keep`` of τ²·KL(softmax(z_t/τ) ‖ softmax(z_s/τ)) (Hinton et al. 2015).

    Only the kept rows are normalised (padding is a fair share of a batch, and each row is a softmax over
    the whole vocabulary); the teacher's side carries no gradient, so KL = Σ p_t·log p_t − Σ p_t·log p_s
    has one term with a graph.
    """
    if temperature <= 0:
        raise ValueError(f"--kd-temperature must be > 0, got {temperature}")
    rows = keep.reshape(-1)
    vocabulary = student_logits.size(-1)
    teacher_log = torch.log_softmax(teacher_logits.reshape(-1, vocabulary)[rows].float() / temperature, dim=-1)
    student_log = torch.log_softmax(student_logits.reshape(-1, vocabulary)[rows].float() / temperature, dim=-1)
    teacher_probs = teacher_log.exp()
    kl = (teacher_probs * teacher_log.detach()).sum() - (teacher_probs.detach() * student_log).sum()
    return kl * temperature**2


def ctc_kd_loss(teacher: Tuple[Tensor, Tensor], student: Tuple[Tensor, Tensor]) -> Tensor:
    """Mean over valid frames of KL(teacher ‖ student) between two CTC heads' (T x B x V log-probabilities,
    valid frames per sentence) outputs; the teacher's side carries no gradient."""
    (teacher_log, teacher_lengths), (student_log, student_lengths) = teacher, student
    if teacher_log.shape != student_log.shape or not torch.equal(teacher_lengths, student_lengths):
        raise DistillationSetupError(
            f"--ctc-kd-weight: the teacher's CTC head sees {tuple(teacher_log.shape[:2])} (frames x batch) and "
            f"the student's {tuple(student_log.shape[:2])}, or other valid frames: frame-level KD needs the same "
            "front-end subsampling (e.g. the same LFR or convolution settings) and the same output units"
        )
    frames = torch.arange(student_log.size(0), device=student_log.device)[:, None] < student_lengths[None, :]
    teacher_log = teacher_log.detach()
    kl = (teacher_log.exp() * (teacher_log - student_log)).sum(dim=-1)
    return (kl * frames).sum() / frames.sum().clamp_min(1)


def window_distribution(probs: Tensor, kernel_size: int, left: int) -> Tensor:
    """(batch, time, time) attention distributions -> (batch, time, K): the mass query t puts on key
    ``t - left + j`` (0 outside the sentence), renormalised over the K taps."""
    time = probs.size(-1)
    padded = F.pad(probs, (left, kernel_size - 1 - left))
    index = torch.arange(time, device=probs.device)[:, None] + torch.arange(kernel_size, device=probs.device)
    window = padded.gather(-1, index.expand(probs.size(0), time, kernel_size))
    return window / window.sum(dim=-1, keepdim=True).clamp_min(1e-12)


def conv_attention_loss(teacher_log_probs: Tensor, conv: ConvView, valid: Tensor) -> Tensor:
    """Mean over conv heads and positions of KL(teacher's windowed attention ‖ conv kernel); the teacher's
    (batch, heads, time, time) log attention is averaged over its heads first."""
    kernel_size = conv.kernel.size(-1)
    target = window_distribution(teacher_log_probs.exp().mean(dim=1), kernel_size, conv.left).unsqueeze(1)
    kernel = conv.kernel.expand(target.size(0), -1, target.size(2), -1)
    terms = torch.special.xlogy(target, target) - target * kernel.clamp_min(1e-12).log()
    return mean_over_positions(terms.sum(dim=-1), valid)


# --------------------------------------------------------------------------------------------
# The criterion.
# --------------------------------------------------------------------------------------------
@dataclass
class MiniLMDistillationConfig(JointCTCAttentionCriterionConfig):
    ctc_weight: float = field(
        default=0.0,
        metadata={"help": "λ of the joint CTC/attention task loss (ASR students, e.g. 0.3); 0: label-smoothed CE"},
    )
    teacher_path: str = field(
        default="", metadata={"help": "checkpoint of the frozen teacher (same dictionaries as the task)"}
    )
    kd_weight: float = field(default=1.0, metadata={"help": "weight of word-level KD on the output distributions"})
    kd_temperature: float = field(default=1.0, metadata={"help": "softmax temperature τ of word-level KD"})
    attention_weight: float = field(
        default=1.0, metadata={"help": "weight of MiniLM's attention-distribution KL (L_AT)"}
    )
    value_relation_weight: float = field(
        default=1.0, metadata={"help": "weight of MiniLM's value-relation KL (L_VR)"}
    )
    conv_attention_weight: float = field(
        default=0.0,
        metadata={"help": "weight of the LSRA convolution attention transfer (student with conv branches)"},
    )
    ctc_kd_weight: float = field(
        default=0.0,
        metadata={"help": "weight of frame-level KD of the CTC head: KL(teacher's CTC posteriors ‖ the student's) "
                  "per encoder frame (speech students with --ctc-weight > 0, a teacher with a CTC head and the "
                  "same front-end subsampling)"},
    )
    distill_side: ChoiceEnum(["encoder", "decoder", "both"]) = field(
        default="encoder", metadata={"help": "whose self-attention the attention terms distil"}
    )
    teacher_layer: int = field(default=-1, metadata={"help": "teacher layer of the attention terms (-1: last)"})
    student_layer: int = field(default=-1, metadata={"help": "student layer of the attention terms (-1: last)"})
    relation_heads: Optional[int] = field(
        default=None,
        metadata={"help": "MiniLMv2 relation heads (default: MiniLM's per-head terms when teacher and student "
                  "have equal head counts, else the teacher's head count)"},
    )


@register_criterion("minilm_distillation", dataclass=MiniLMDistillationConfig)
class MiniLMDistillationCriterion(JointCTCAttentionCriterion):
    """Task loss + kd_weight·KD + (attention_weight·L_AT + value_relation_weight·L_VR +
    conv_attention_weight·L_conv + ctc_kd_weight·L_CTC-KD)·sample_size.

    KD is a sum over target tokens like the CE; the other terms are means (per head and position, per
    frame), scaled by ``sample_size`` so that the Trainer's division leaves them means. Logged (nats):
    ``kd_loss`` per target token, ``at_loss``, ``vr_loss``, ``conv_at_loss`` per head and position,
    ``ctc_kd_loss`` per frame.
    """

    def __init__(
        self,
        task: Any,
        sentence_avg: bool,
        label_smoothing: float,
        teacher_path: str,
        ignore_prefix_size: int = 0,
        report_accuracy: bool = False,
        ctc_weight: float = 0.0,
        ctc_zero_infinity: bool = True,
        post_process: Optional[str] = None,
        kd_weight: float = 1.0,
        kd_temperature: float = 1.0,
        attention_weight: float = 1.0,
        value_relation_weight: float = 1.0,
        conv_attention_weight: float = 0.0,
        ctc_kd_weight: float = 0.0,
        distill_side: str = "encoder",
        teacher_layer: int = -1,
        student_layer: int = -1,
        relation_heads: Optional[int] = None,
    ) -> None:
        super().__init__(
            task, sentence_avg, label_smoothing, ignore_prefix_size, report_accuracy,
            ctc_weight, ctc_zero_infinity, post_process,
        )
        for name, value in (("kd-weight", kd_weight), ("attention-weight", attention_weight),
                            ("value-relation-weight", value_relation_weight),
                            ("conv-attention-weight", conv_attention_weight), ("ctc-kd-weight", ctc_kd_weight)):
            if value < 0:
                raise ValueError(f"--{name} must be >= 0, got {value}")
        if ctc_kd_weight > 0 and ctc_weight <= 0:
            raise ValueError("--ctc-kd-weight distils the student's CTC head: it needs --ctc-weight > 0")
        if relation_heads is not None and relation_heads <= 0:
            raise ValueError(f"--relation-heads must be > 0, got {relation_heads}")
        self.kd_weight, self.kd_temperature = kd_weight, kd_temperature
        self.attention_weight, self.value_relation_weight = attention_weight, value_relation_weight
        self.conv_attention_weight = conv_attention_weight
        self.ctc_kd_weight = ctc_kd_weight
        self.relation_heads = relation_heads
        self.sides: Tuple[str, ...] = SIDES if distill_side == "both" else (str(distill_side),)
        self.student_layer = student_layer
        self.teacher = FrozenTeacher(load_teacher(teacher_path, task))
        who = f"teacher {teacher_path}"
        if ctc_kd_weight > 0:
            try:
                find_ctc_head(self.teacher.model)
            except CTCHeadError:
                raise DistillationSetupError(
                    f"--ctc-kd-weight: {who} has no CTC head (a speech model trained with --ctc-weight > 0 has one)"
                ) from None
        self.teacher_taps = self._taps(self.teacher.model, teacher_layer, "--teacher-layer", who, student=False)
        self.student_taps: Optional[List[LayerTap]] = None

    @property
    def _uses_attention(self) -> bool:
        return self.attention_weight > 0 or self.value_relation_weight > 0

    def _taps(self, model: Any, layer: int, option: str, who: str, student: bool) -> List[LayerTap]:
        """A checked tap per distilled side: attention for L_AT/L_VR (and, in the teacher, as the target of
        the conv term), the student's convolutions for the conv term; none when no such term is on."""
        attention = self._uses_attention or (not student and self.conv_attention_weight > 0)
        convolution = student and self.conv_attention_weight > 0
        if not (attention or convolution):
            return []
        return [LayerTap(model, side, layer, option, who, attention, convolution) for side in self.sides]

    def _describe(self, teacher: LayerTap, student: LayerTap) -> str:
        """One line saying which layers are paired and which form of the attention terms applies."""
        line = f"minilm_distillation, {teacher.side}: teacher layer {teacher.index} -> student layer {student.index}"
        if teacher.attention is None or student.attention is None:
            return line + " (convolution attention transfer only)"
        heads = (attention_heads(teacher.attention), attention_heads(student.attention))
        if self.relation_heads is None and heads[0] == heads[1]:
            form = f"MiniLM per-head attention and value relations ({heads[0]} heads)"
        else:
            form = f"MiniLMv2 Q-Q/K-K/V-V relations over {self.relation_heads or heads[0]} relation heads"
        return f"{line}, teacher {heads[0]} / student {heads[1]} heads: {form}"

    def forward(self, model: Any, sample: Dict[str, Any], reduce: bool = True) -> Tuple[Tensor, int, Dict[str, Any]]:
        """Return (loss, sample_size, logging_output): the task loss plus the weighted distillation terms."""
        if not reduce:
            raise ValueError("minilm_distillation only computes batch sums (reduce=True)")
        if self.student_taps is None:
            self.student_taps = self._taps(model, self.student_layer, "--student-layer", "student", student=True)
            self.teacher.follow(model)
            for teacher_tap, student_tap in zip(self.teacher_taps, self.student_taps):
                logger.info(self._describe(teacher_tap, student_tap))
        with _recording(self.student_taps):
            net_output = model(**sample["net_input"])
        loss, sample_size, logging_output = self.task_loss(model, net_output, sample)
        if self.kd_weight == 0 and self.ctc_kd_weight == 0 and not self.teacher_taps:
            return loss, sample_size, logging_output  # every distillation weight is 0: no teacher pass

        with _recording(self.teacher_taps):
            teacher_output = self.teacher(sample["net_input"])
        terms = self._distillation_terms(model, net_output, teacher_output, sample)
        weights = {"kd_loss": self.kd_weight, "at_loss": self.attention_weight,
                   "vr_loss": self.value_relation_weight, "conv_at_loss": self.conv_attention_weight,
                   "ctc_kd_loss": self.ctc_kd_weight}
        for name, value in terms.items():
            scale = 1.0 if name == "kd_loss" else float(sample_size)
            loss = loss + weights[name] * scale * value
            logging_output[name] = (value * scale).data
        logging_output["loss"] = loss.data
        return loss, sample_size, logging_output

    def _distillation_terms(self, model: Any, net_output: Any, teacher_output: Any,
                            sample: Dict[str, Any]) -> Dict[str, Tensor]:
        """The weighted terms whose weights are > 0, each unweighted (KD a sum, the others means)."""
        terms: Dict[str, Tensor] = {}
        if self.kd_weight > 0:
            target = sample["target"][:, self.ignore_prefix_size:]
            terms["kd_loss"] = word_kd_loss(
                teacher_output[0][:, self.ignore_prefix_size:], net_output[0][:, self.ignore_prefix_size:],
                target.ne(self.padding_idx), self.kd_temperature,
            )
        if self.ctc_kd_weight > 0:
            with torch.no_grad():
                teacher_ctc = ctc_log_probs(find_ctc_head(self.teacher.model), encoder_out_of(teacher_output))
            student_ctc = ctc_log_probs(find_ctc_head(model), encoder_out_of(net_output))
            terms["ctc_kd_loss"] = ctc_kd_loss(teacher_ctc, student_ctc)
        per_side: Dict[str, List[Tensor]] = {}
        for teacher_tap, student_tap in zip(self.teacher_taps, self.student_taps or []):
            teacher_view = teacher_tap.attention_view()
            if self._uses_attention:
                at, vr = minilm_losses(teacher_view, student_tap.attention_view(), self.relation_heads)
                per_side.setdefault("at_loss", []).append(at)
                per_side.setdefault("vr_loss", []).append(vr)
            if self.conv_attention_weight > 0:
                teacher_log_probs = attention_log_probs(teacher_view)
                convs = [conv_attention_loss(teacher_log_probs, conv, teacher_view.valid)
                         for conv in student_tap.conv_views()]
                per_side.setdefault("conv_at_loss", []).append(torch.stack(convs).mean())
        terms.update({name: torch.stack(values).mean() for name, values in per_side.items()})
        return terms

    @classmethod
    def reduce_metrics(cls, logging_outputs: List[Dict[str, Any]]) -> None:
        """The task loss's metrics plus each distillation term (see the class docstring)."""
        super().reduce_metrics(logging_outputs)
        sample_size = sum(log.get("sample_size", 0) for log in logging_outputs)
        ntokens = sum(log.get("ntokens", 0) for log in logging_outputs)
        for name in TERMS:
            if any(name in log for log in logging_outputs):
                total = sum(log.get(name, 0) for log in logging_outputs)
                size = ntokens if name == "kd_loss" else sample_size
                metrics.log_scalar(name, total / max(size, 1), size, round=4)



@contextlib.contextmanager
def _recording(taps: Sequence[LayerTap]) -> Iterator[None]:
    """Record the inputs of every tap in ``taps`` during a ``with`` block."""
    with contextlib.ExitStack() as stack:
        for tap in taps:
            stack.enter_context(tap.recording())
        yield
