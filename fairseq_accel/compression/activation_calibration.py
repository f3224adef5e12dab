"""Calibration of the inputs of every linear layer: forward pre-hooks fill one |x| histogram per layer
while calibration batches run through the model (teacher-forced, as in training), and the histograms give
each layer's activation scale (:mod:`~fairseq_accel.compression.calibration`), or, for similarity-aware
calibration, a sample of its input rows does (:mod:`~fairseq_accel.compression.similarity_calibration`), and
for ranking-aware calibration also a sample of the sentences each attention layer saw
(:mod:`~fairseq_accel.compression.ranking_calibration`). The outputs of the decoder's
attention projections are calibrated too (the largest |y| per output channel): the fast generator writes
them into its int8 key/value caches straight from the int8 GEMM (``Int8Linear.forward_levels``).

The state (histograms and the number of batches seen) is saved as the run goes, so a run that stops resumes
where it stopped; states of different batch shards, calibrated by different processes or machines, merge
exactly into the state of one run over all of them.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from fairseq.modules import MultiheadAttention
from torch import Tensor, nn

from fairseq_accel.compat.checkpoint_files import write_checkpoint
from fairseq_accel.compression.calibration import AbsHistogram, CalibrationError, int8_scale
from fairseq_accel.compression.ranking_calibration import (
    RANKING,
    RANKING_WEIGHT,
    AttentionLayout,
    SentenceSample,
    ranking_penalty,
    sentences,
)
from fairseq_accel.compression.similarity_calibration import RowSample, similarity_threshold
from fairseq_accel.inference.int8_execution import call_projection_modules
from fairseq_accel.modules.int8_linear import SIGNED_ZERO_POINT, UNSIGNED_ZERO_POINT, activation_max_level
from fairseq_accel.modules.sanm_attention import MultiHeadedCrossAttention

STATE_VERSION = 3  # 2: with the output ranges of the attention projections; 3: attention sentence samples


def linear_layers(model: nn.Module) -> Dict[str, nn.Linear]:
    """Every ``nn.Linear`` of ``model`` by its first module name (a shared layer once)."""
    return {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}


def _cached_outputs(attention: nn.Module) -> Tuple[str, ...]:
    """The projections of a decoder attention layer whose outputs the fast generator caches as int8 levels:
    keys and values (and the query, which self-attention computes in the same fused int8 GEMM)."""
    if isinstance(attention, MultiheadAttention):
        return ("q_proj", "k_proj", "v_proj") if attention.self_attention else ("k_proj", "v_proj")
    if isinstance(attention, MultiHeadedCrossAttention):  # SAN-M: keys and values in one projection
        return ("linear_k_v",)
    return ()


def cached_projections(model: nn.Module) -> List[str]:
    """Names of the decoder's attention projections whose outputs go into the fast generator's key/value
    caches, whose output ranges calibration records."""
    return [f"{name}.{projection}" for name, module in model.named_modules() if name.startswith("decoder.")
            for projection in _cached_outputs(module)]


SIMILARITY = "pearson"  # the --act-calib methods that need row samples: similarity-aware calibration, ...
SAMPLED_METHODS = (SIMILARITY, RANKING)  # ... and ranking-aware, which samples attention layers' sentences too


def keep_float_hint(name: str) -> str:
    return f"to keep this layer in float32 instead: --keep-float '{name}\\.'"


class LinearInputCalibrator:
    """One :class:`AbsHistogram` per linear layer input (by the layer's module name), with ``sample_rows`` a
    :class:`RowSample` of its input rows too, the largest |y| per output channel of the layers in
    ``output_names``, and a :class:`SentenceSample` of each attention layer in ``attentions``."""

    def __init__(self, names: Iterable[str], output_names: Iterable[str] = (), sample_rows: int = 0,
                 attentions: Optional[Dict[str, AttentionLayout]] = None):
        self.histograms = {name: AbsHistogram(name) for name in names}
        self.minima = {name: float("inf") for name in self.histograms}  # non-negative inputs get unsigned levels
        self.samples = {name: RowSample(name, sample_rows) for name in self.histograms} if sample_rows else {}
        self.sentences = {name: SentenceSample(name, layout) for name, layout in (attentions or {}).items()}
        self.output_absmax: Dict[str, Optional[Tensor]] = {name: None for name in output_names}
        self.target_padding: Optional[Tensor] = None  # (batch, target length) of the batch running now
        self.batches = 0  # calibration batches seen (resumed runs skip them)

    def _record(self, name: str, x: Tensor) -> None:
        self.histograms[name].add(x)
        if self.samples:
            self.samples[name].add(x)
        if x.numel():
            self.minima[name] = min(self.minima[name], float(x.min()))

    def _record_sentences(self, name: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        sample = self.sentences[name]
        for queries, keys in sentences(module, args, kwargs, self.target_padding, sample.layout.decoder_queries):
            sample.add(queries, keys)

    def _record_output(self, name: str, y: Tensor) -> None:
        absmax = y.detach().float().abs().reshape(-1, y.size(-1)).amax(dim=0)
        seen = self.output_absmax[name]
        self.output_absmax[name] = absmax if seen is None else torch.maximum(seen, absmax)

    @contextmanager
    def hooks(self, model: nn.Module) -> Iterator[None]:
        """Record the inputs of ``model``'s linear layers (and the outputs of those in ``output_absmax``)
        while the context is open."""
        layers = linear_layers(model)
        handles = [
            layer.register_forward_pre_hook(lambda module, inputs, name=name: self._record(name, inputs[0]))
            for name, layer in layers.items()
        ] + [
            layers[name].register_forward_hook(lambda module, inputs, y, name=name: self._record_output(name, y))
            for name in self.output_absmax
        ]
        modules = dict(model.named_modules())
        handles += [
            modules[name].register_forward_pre_hook(
                lambda module, args, kwargs, name=name: self._record_sentences(name, module, args, kwargs),
                with_kwargs=True)
            for name in self.sentences
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def state_dict(self, meta: Dict[str, Any]) -> Dict[str, Any]:
        return {"version": STATE_VERSION, "batches": self.batches, "meta": dict(meta), "minima": dict(self.minima),
                "histograms": {name: h.state_dict() for name, h in self.histograms.items()},
                "output_absmax": dict(self.output_absmax),
                "samples": {name: sample.state_dict() for name, sample in self.samples.items()},
                "sentences": {name: sample.state_dict() for name, sample in self.sentences.items()}}

    def load_state_dict(self, state: Dict[str, Any], source: str) -> None:
        """Resume from (or merge in, when this calibrator has seen batches already) a saved state."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise CalibrationError(f"{source}: not a calibration state of version {STATE_VERSION} "
                                   f"(got {state.get('version') if isinstance(state, dict) else type(state).__name__})")
        ours = set(self.histograms) | {f"{name} (output)" for name in self.output_absmax}
        theirs = set(state["histograms"]) | {f"{name} (output)" for name in state["output_absmax"]}
        missing, unknown = sorted(ours - theirs), sorted(theirs - ours)
        if missing or unknown:
            raise CalibrationError(f"{source}: calibrated another model (layers missing there: {missing[:3]}, "
                                   f"layers this model lacks: {unknown[:3]})")
        for name, saved in state["histograms"].items():
            self.histograms[name].merge(AbsHistogram.from_state_dict(saved))
            self.minima[name] = min(self.minima[name], float(state["minima"][name]))
        for name, absmax in state["output_absmax"].items():
            if absmax is not None:
                self._record_output(name, absmax[None])
        if bool(self.samples) != bool(state["samples"]) or set(self.sentences) != set(state["sentences"]):
            raise CalibrationError(f"{source}: calibrated with other samples (input rows: {bool(state['samples'])}, "
                                   f"attention sentences: {bool(state['sentences'])}) than this run (input rows: "
                                   f"{bool(self.samples)}, attention sentences: {bool(self.sentences)}); every part "
                                   f"needs the same --act-calib")
        for name, sample in state["samples"].items():
            self.samples[name].merge(RowSample.from_state_dict(sample))
        for name, sample in state["sentences"].items():
            self.sentences[name].merge(SentenceSample.from_state_dict(sample))
        self.batches += int(state["batches"])

    def save(self, path: Path, meta: Dict[str, Any]) -> None:
        write_checkpoint(self.state_dict(meta), path)

    def require_batches(self) -> None:
        """:class:`CalibrationError` if no batch has been seen."""
        if self.batches == 0:
            raise CalibrationError("the calibration set is empty: no batch ran through the model (check "
                                   "--calib-subset, --calib-shard and that the subset has sentences)")

    def quantizers(self, method: str, names: Iterable[str],
                   weights: Optional[Dict[str, Tuple[Tensor, Optional[Tensor]]]] = None,
                   ranking_weight: float = RANKING_WEIGHT) -> Dict[str, Tuple[float, int]]:
        """Input scale and zero point of each layer in ``names`` for :class:`Int8Linear` (unsigned levels where
        calibration saw no negative input); a layer that no batch ran is a :class:`CalibrationError` naming it.
        The similarity- and ranking-aware methods also need the ``weights`` (weight, bias) of every calibrated
        layer (for ranking, those kept in float too: an attention's other projection)."""
        self.require_batches()
        names = list(names)
        sampled = method in SAMPLED_METHODS
        thresholds = self._similarity_thresholds(names, weights, method, ranking_weight) if sampled else {}
        quantizers = {}
        for name in names:
            zero_point = self._zero_point(name)
            max_level = activation_max_level(zero_point)
            try:
                scale = (thresholds[name] / max_level if sampled
                         else int8_scale(self.histograms[name], method, max_level))
            except CalibrationError as error:
                raise CalibrationError(f"{error}; {keep_float_hint(name)}") from None
            quantizers[name] = (scale, zero_point)
        return quantizers

    def _zero_point(self, name: str) -> int:
        return UNSIGNED_ZERO_POINT if self.minima[name] >= 0 else SIGNED_ZERO_POINT

    def _similarity_thresholds(self, names: List[str], weights: Dict[str, Tuple[Tensor, Optional[Tensor]]],
                               method: str, ranking_weight: float) -> Dict[str, float]:
        """The similarity-aware (or ranking-aware) threshold of each layer; layers that read the same input
        (the same sampled rows: a self-attention's query, key and value projections) get one, best for them
        together."""
        if method == RANKING and not self.sentences:
            raise CalibrationError(f"--act-calib {RANKING} needs the sentences each attention layer saw; this "
                                   f"calibration ran without them (calibrate again with --act-calib {RANKING})")
        groups: Dict[bytes, List[str]] = {}
        for name in names:
            sample = self.samples.get(name)
            if sample is None or sample.rows is None:
                raise CalibrationError(f"{name}: no input rows were sampled for --act-calib {method} (the "
                                       f"calibration ran with another method, or no batch reached this layer); "
                                       f"{keep_float_hint(name)}")
            groups.setdefault(sample.keys.numpy().tobytes(), []).append(name)
        thresholds = {}
        for group in groups.values():
            penalty = (ranking_penalty(list(self.sentences.values()), group, weights, ranking_weight)
                       if method == RANKING else None)
            threshold = similarity_threshold(self.samples[group[0]], [weights[name] for name in group],
                                             self._zero_point(group[0]), penalty)
            thresholds.update(dict.fromkeys(group, threshold))
        return thresholds


def teacher_forced_forward(model: nn.Module, net_input: Dict[str, Tensor]) -> Any:
    """The forward of an encoder-decoder model over every layer decoding uses: encoder, decoder on the
    reference prefix (teacher forcing), and the encoder's CTC head where the model has one; returns the
    decoder's output."""
    encoder_out = model.encoder(net_input["src_tokens"], src_lengths=net_input["src_lengths"])
    decoder_out = model.decoder(net_input["prev_output_tokens"], encoder_out=encoder_out)
    ctc_head = getattr(model.encoder, "ctc_proj", None)
    if ctc_head is not None:
        from fairseq_accel.models.ctc_head import ctc_log_probs

        ctc_log_probs(ctc_head, encoder_out)
    return decoder_out


def run_calibration(model: nn.Module, calibrator: LinearInputCalibrator, batches: Iterable[Dict[str, Any]],
                    save: Optional[Callable[[], None]] = None, save_every: int = 10, progress: Optional[Any] = None) -> None:
    """Run ``batches`` (fairseq samples) through ``model`` under the calibrator's hooks, skipping the
    ``calibrator.batches`` first (done by an earlier run), calling ``save()`` every ``save_every`` batches
    and at the end."""
    model.eval()
    call_projection_modules(model)
    padding_index = model.decoder.dictionary.pad()
    with torch.no_grad(), calibrator.hooks(model):
        for index, sample in enumerate(batches):
            if progress is not None:
                progress.update(1)
            if index < calibrator.batches:
                continue
            calibrator.target_padding = sample["net_input"]["prev_output_tokens"].eq(padding_index)
            teacher_forced_forward(model, sample["net_input"])
            calibrator.batches += 1
            if save is not None and calibrator.batches % save_every == 0:
                save()
    if save is not None:
        save()


def calibration_batches(task: Any, model: nn.Module, subset: str, count: int, max_tokens: int,
                        shard: Tuple[int, int] = (0, 1)) -> Iterator[Dict[str, Any]]:
    """The first ``count`` batches of ``subset`` in a fixed random order (seed 1: the same batches on every
    run, so a resumed run continues with the next ones), of this ``shard`` (index, number of shards).
    A subset that cannot be loaded is a :class:`CalibrationError` naming it."""
    try:
        task.load_dataset(subset)
    except (OSError, ValueError) as error:  # missing files; ValueError: fairseq cannot map an empty subset
        raise CalibrationError(f"calibration subset {subset!r} cannot be loaded: {error}") from None
    dataset = task.dataset(subset)
    iterator = task.get_batch_iterator(
        dataset=dataset, max_tokens=max_tokens, max_positions=model.max_positions(),
        ignore_invalid_inputs=True, seed=1, num_shards=shard[1], shard_id=shard[0],
    ).next_epoch_itr(shuffle=True)
    given = 0
    for sample in iterator:
        if given == count:
            return
        if sample:
            given += 1
            yield sample
