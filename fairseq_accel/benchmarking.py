"""Decoding speed of one checkpoint under several generators, side by side (``fairseq-accel-benchmark``).

Every system decodes the same batches of the same subset in one process (the subset's first ``--max-sentences``,
batched as fairseq-generate batches them: in the dataset's length order): fairseq's ``SequenceGenerator``
(stock), the fast generator with an fp32 and an int8 key/value cache (fast-torch: fp32, without its C++ or
CUDA kernels; at N > 1 threads it decodes N shards of each batch, one thread each, and fast-operations runs
every operation on the N threads instead), for a calibrated compressed checkpoint
(``fairseq-accel-compress --data``) the fast generator with its int8 layers (those of at least
``--int8-min-weights``; w8a8, w8a8-kv8 with the int8 self-attention cache too, w8a8-kv8-cross with int8
cross-attention keys/values as well; where the checkpoint has calibrated output ranges, the int8 caches
take the int8 projections' output levels as they are; the other systems run its weights in float32), and
for a stock ``transformer`` checkpoint CTranslate2 float32/int8 through its fairseq converter (when
``ctranslate2`` is installed; for a compressed checkpoint, of the float checkpoint it was made from,
``--ct2-from``; at batch sizes above one also as N translators of one thread each, ``--ct2-translators``, that
take parts of each batch at the same time, as the fast generator's sentence shards do: "by sentence" in the
threads column). For w8a8 a second table times an int8 GEMM against float32 for each linear layer shape of the
decoder at its row counts (batch x beam).
Every system runs at every thread count: first its first batch alone (building and warming up: reported
apart as "first batch s"), then ``repeats`` timed passes over all batches, the systems taking turns (stock,
fast, ..., stock, fast, ...), so that a change of the machine's load falls on every system alike. A row holds
a system's best thread count, its median time, tokens per second, the ratio to stock at the same batch size,
BLEU (translation) or WER (speech) of what it produced, and the peak resident memory of the process while that
system ran (Linux: the peak is reset before each of its passes); for speech also utterances per second and the
real-time factor (decoding seconds per second of audio; the audio's length is taken from its filterbank frames:
25 ms windows every 10 ms). Timing covers ``generate`` only (the encoder
included), not data loading or scoring. This machine's noise is why the numbers are ratios measured in
one run: compare rows, not runs. The recipes draw the rows' speed against their score
(egs/tools/plot_frontier.py, from ``--json``).
"""
import argparse
import copy
import dataclasses
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import fairseq_accel.plugin  # noqa: F401  (registers the plugin, makes checkpoints load)
from fairseq import checkpoint_utils
from fairseq.data import data_utils
from fairseq.dataclass.configs import GenerationConfig
from fairseq.tasks import TASK_REGISTRY
from omegaconf import OmegaConf

from fairseq_accel.compat.checkpoint_files import COMPRESSED_KEY
from fairseq_accel.data.features import audio_seconds
from fairseq_accel.decoding_metrics import corpus_score, token_decoder
from fairseq_accel.inference.int8_execution import convert_to_int8
from fairseq_accel.modules.int8_linear import Int8Linear
from fairseq_accel.tasks.accel_generation import AccelGenerationConfig, build_accel_generator

# system -> fast generator options (None: fairseq's SequenceGenerator)
FAIRSEQ_SYSTEMS = {
    "stock": None,
    "fast": {"kv_cache_dtype": "fp32"},
    "fast-torch": {"kv_cache_dtype": "fp32", "accel_kernels": "torch"},  # without the C++/CUDA kernels
    "fast-fp16": {"kv_cache_dtype": "fp16"},
    "fast-int8": {"kv_cache_dtype": "int8"},
    "fast-int8-channel": {"kv_cache_dtype": "int8", "key_scale": "channel"},
    "fast-int8-cross": {"kv_cache_dtype": "int8", "quantize_cross_kv": True},
    "fast-w8a8": {"kv_cache_dtype": "fp32"},
    "fast-w8a8-kv8": {"kv_cache_dtype": "int8"},
    "fast-w8a8-kv8-cross": {"kv_cache_dtype": "int8", "quantize_cross_kv": True},
    "fast-operations": {"kv_cache_dtype": "fp32", "accel_parallel": "operations"},  # threads share every operation
}
INT8_LINEAR_SYSTEMS = ("fast-w8a8", "fast-w8a8-kv8", "fast-w8a8-kv8-cross")  # the compressed checkpoint's int8 layers
CT2_SYSTEMS = {"ct2-float32": "float32", "ct2-int8": "int8"}
DEFAULT_SYSTEMS = ["stock", "fast", "fast-int8", "fast-int8-cross", *INT8_LINEAR_SYSTEMS, "ct2-float32", "ct2-int8"]


class BenchmarkError(Exception):
    """A problem with the inputs, said in one line."""


@dataclass
class Row:
    system: str
    threads: int
    batch: int
    beam: int
    sentences: int
    tokens: int
    seconds: float
    score_name: str
    score: float
    first_batch_seconds: float  # the first batch alone, before the timed passes: building and warm-up
    peak_rss_mb: Optional[float]  # the process' peak resident memory while this system decoded (Linux)
    self_kv_bytes: Optional[int] = None  # per decoded sentence, all beams (fast generator only)
    cross_kv_bytes: Optional[int] = None
    audio_seconds: Optional[float] = None  # speech: the decoded audio's length
    by_sentence: bool = False  # the threads decoded shards of each batch (CTranslate2: translators), one thread each
    ratio: float = field(default=float("nan"))

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds

    @property
    def sentences_per_second(self) -> float:
        return self.sentences / self.seconds

    @property
    def real_time_factor(self) -> Optional[float]:
        """Decoding seconds per second of audio (speech only)."""
        return None if self.audio_seconds is None else self.seconds / self.audio_seconds


@dataclass
class Workload:
    """What every system decodes: the subset's batches and how to turn token ids into scored text."""

    task: object
    models: List[torch.nn.Module]
    batches: List[dict]
    references: Dict[int, str]
    to_text: Callable[[torch.Tensor], str]
    score_name: str
    beam: int
    batch_size: int
    max_len_a: float
    max_len_b: int
    int8_model: Optional[torch.nn.Module] = None  # the model with int8 linear layers (calibrated compressed checkpoints)
    audio_seconds: Optional[float] = None  # speech: the length of the batches' audio


def load_checkpoint(args, task_name: Optional[str] = None) -> Tuple[object, List[torch.nn.Module]]:
    """The task and models of ``args.path`` for ``args.data``, under ``task_name`` if given (else the task the
    checkpoint was trained with)."""
    if not Path(args.path).is_file():
        raise BenchmarkError(f"--path {args.path}: no such checkpoint")
    if not Path(args.data).is_dir():
        raise BenchmarkError(f"data directory {args.data} does not exist")
    # the generation options a checkpoint's task config saved (the defaults of when it was trained) do not apply:
    # each benchmarked system sets its own
    overrides = {"data": args.data, "config_yaml": args.config_yaml,
                 **{option.name: option.default for option in dataclasses.fields(AccelGenerationConfig)
                    if not option.name.startswith("_")}}
    if task_name is not None:
        if task_name not in TASK_REGISTRY:
            raise BenchmarkError(f"--task {task_name}: no such task (e.g. translation_accel, speech_to_text_accel)")
        # a dict replaces the task section's fields, adding those the checkpoint's own task lacks; fairseq drops
        # the ones the new task's config does not have
        overrides["task"] = {"_name": task_name, **overrides}
    models, _cfg, task = checkpoint_utils.load_model_ensemble_and_task([args.path], arg_overrides=overrides)
    for model in models:
        model.eval()
    return task, models


def build_workload(args, batch_size: int, task, models, int8: Optional[torch.nn.Module] = None) -> Workload:
    to_text = token_decoder(task, args.remove_bpe)
    dataset = task.dataset(args.gen_subset)
    limit = min(len(dataset), args.max_sentences or len(dataset))
    # fairseq-generate's batches: the dataset's own order (sorted by length), ``batch_size`` sentences each
    indices = [int(i) for i in dataset.ordered_indices() if i < limit]
    batches = [dataset.collater([dataset[i] for i in indices[start : start + batch_size]])
               for start in range(0, limit, batch_size)]
    batches = [batch for batch in batches if batch]
    references = {}
    for batch in batches:
        for sample_id, target in zip(batch["id"].tolist(), batch["target"]):
            references[sample_id] = to_text(target)
    speech = hasattr(task, "data_cfg")
    audio = sum(audio_seconds(frames) for batch in batches for frames in batch["net_input"]["src_lengths"].tolist())
    return Workload(task, models, batches, references, to_text, "WER" if speech else "BLEU", args.beam, batch_size,
                    args.max_len_a, args.max_len_b, int8, audio if speech else None)


def _score(work: Workload, hypotheses: Dict[int, str]) -> float:
    ids = sorted(work.references)
    refs, hyps = [work.references[i] for i in ids], [hypotheses.get(i, "") for i in ids]
    return corpus_score(work.score_name.lower(), refs, hyps)


def take_int8_model(task, models: List[torch.nn.Module], min_weights: int) -> Optional[torch.nn.Module]:
    """A copy of the model with the int8 layers of its compressed checkpoint, or None if the checkpoint has
    none (not compressed, or compressed without calibration). The task forgets the compressed section, so
    that its generators run ``models`` as they are (float32) for the other systems."""
    section = getattr(task, "compressed_section", None)
    if section is not None:
        task.compressed_section = None
    if section is None or "activations" not in section or len(models) != 1:
        return None
    model = copy.deepcopy(models[0])
    convert_to_int8(model, section, "the compressed checkpoint", min_weights)
    return model


def _fairseq_generator(work: Workload, system: str):
    # a DictConfig, as fairseq-generate passes: speech_to_text's build_generator asks `"eos_token" in args`
    gen_cfg = OmegaConf.structured(GenerationConfig(beam=work.beam, max_len_a=work.max_len_a, max_len_b=work.max_len_b))
    models = [work.int8_model] if system in INT8_LINEAR_SYSTEMS else work.models
    stock = work.task.build_generator(models, gen_cfg)
    options = FAIRSEQ_SYSTEMS[system]
    if options is None:
        return stock
    # each setting sets its own thread count: the generator leaves it alone
    accel = AccelGenerationConfig(accel_generator="fast", no_accel_fallback=True, accel_threads="torch", **options)
    return build_accel_generator(stock, models, accel)


def _run_fairseq(work: Workload, generator, batches: Sequence[dict]) -> Tuple[float, int, Dict[int, str]]:
    seconds, tokens, hypotheses = 0.0, 0, {}
    for batch in batches:
        start = time.perf_counter()
        output = work.task.inference_step(generator, work.models, batch)
        seconds += time.perf_counter() - start
        for sample_id, hypos in zip(batch["id"].tolist(), output):
            tokens += len(hypos[0]["tokens"])
            hypotheses[sample_id] = work.to_text(hypos[0]["tokens"])
    return seconds, tokens, hypotheses


def _cache_bytes(generator) -> Tuple[Optional[int], Optional[int]]:
    """Self- and cross-attention key/value bytes per decoded sentence (fast generator only)."""
    stats = getattr(generator, "cache_stats", None)
    per_sentence = None if stats is None else stats.per_sentence()
    if per_sentence is None:
        return None, None
    return round(per_sentence.self_attention), round(per_sentence.cross_attention)


Pass = Tuple[float, int, Dict[int, str]]  # seconds, tokens, hypotheses by sample id
_PEAK_RESET, _STATUS = Path("/proc/self/clear_refs"), Path("/proc/self/status")


def _reset_peak_rss() -> None:
    """Start a new peak of resident memory (Linux: writing 5 to clear_refs resets VmHWM)."""
    try:
        _PEAK_RESET.write_text("5")
    except OSError:
        pass


def _peak_rss_mb() -> Optional[float]:
    """The process' peak resident memory since the last reset, in MiB (None where /proc has no VmHWM)."""
    try:
        line = next(line for line in _STATUS.read_text().splitlines() if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) / 1024


@dataclass
class _Setting:
    """One system at one thread count, and what its runs measured."""

    system: str
    threads: int
    run: Callable[[Sequence[dict]], Pass]
    generator: object = None  # the fairseq generator (its cache statistics), None for CTranslate2
    by_sentence: bool = False  # threads > 1 decode shards of a batch, one thread each
    first_batch_seconds: float = float("nan")
    passes: List[Pass] = field(default_factory=list)
    peak_rss_mb: Optional[float] = None

    def _timed(self, batches: Sequence[dict]) -> Pass:
        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        _reset_peak_rss()
        try:
            result = self.run(batches)
        finally:
            torch.set_num_threads(previous)
        peak = _peak_rss_mb()
        if peak is not None:
            self.peak_rss_mb = max(self.peak_rss_mb or 0.0, peak)
        return result

    def warm_up(self, batches: Sequence[dict]) -> None:
        start = time.perf_counter()
        self._timed(batches[:1])
        self.first_batch_seconds = time.perf_counter() - start

    def timed_pass(self, batches: Sequence[dict]) -> None:
        self.passes.append(self._timed(batches))

    @property
    def median_seconds(self) -> float:
        return statistics.median(p[0] for p in self.passes)


def _measure_in_turn(settings: List[_Setting], work: Workload, repeats: int, progress: Callable[[str], None]) -> None:
    """Each setting's first batch, then ``repeats`` rounds in which every setting decodes all batches."""
    progress(f"first batches, batch {work.batch_size}: {len(settings)} settings "
             f"({', '.join(dict.fromkeys(s.system for s in settings))})")
    for setting in settings:
        setting.warm_up(work.batches)
    for round_index in range(repeats):
        progress(f"round {round_index + 1}/{repeats}, batch {work.batch_size}: {len(settings)} settings in turn")
        for setting in settings:
            setting.timed_pass(work.batches)


def _ct2_sources(work: Workload) -> List[Tuple[int, List[str]]]:
    """(sample id, source subword strings without EOS) in batch order: what CTranslate2 translates."""
    src_dict = work.task.source_dictionary
    sources = []
    for batch in work.batches:
        for sample_id, src in zip(batch["id"].tolist(), batch["net_input"]["src_tokens"]):
            keep = src.ne(src_dict.pad()) & src.ne(src_dict.eos())
            sources.append((sample_id, [src_dict[i] for i in src[keep].tolist()]))
    return sources


def _is_compressed(path: str) -> bool:
    """Whether ``path`` is a compressed checkpoint (fairseq-accel-compress): the plugin's loader expands it and
    hands its packed section to the task state."""
    state = checkpoint_utils.load_checkpoint_to_cpu(path)
    return COMPRESSED_KEY in (state.get("task_state") or {})


def _ct2_unavailable(args, work: Workload) -> Optional[str]:
    try:
        import ctranslate2  # noqa: F401
    except ImportError:
        return "ctranslate2 is not installed (pip install ctranslate2)"
    if type(work.models[0]).__name__ != "TransformerModel":
        return f"CTranslate2 converts stock fairseq transformer models, not {type(work.models[0]).__name__}"
    if args.ct2_from is None and _is_compressed(args.path):
        return ("--path is a compressed checkpoint, which CTranslate2's converter cannot read: give the float "
                "checkpoint it was made from with --ct2-from")
    return None


def _ct2_convert(args, work: Workload, quantization: str, directory: Path) -> Path:
    """The checkpoint (``--ct2-from``, else ``--path``) converted by CTranslate2's fairseq converter (once per
    quantization).

    The converter calls ``torch.load`` on the checkpoint itself; it is routed through the plugin's
    checked loader, so the checkpoint's allowlist and trust apply as for fairseq's own loads.
    """
    from ctranslate2.converters import FairseqConverter

    from fairseq_accel.compat.checkpoint_loading import torch_load_through_checks

    target = directory / quantization
    if not target.exists():
        cfg = work.task.cfg
        converter = FairseqConverter(args.ct2_from or args.path, args.data, source_lang=cfg.source_lang,
                                     target_lang=cfg.target_lang)
        with torch_load_through_checks():
            converter.convert(str(target), quantization=quantization)
    return target


def _ct2_runner(args, work: Workload, model_dir: Path, translators: int = 1):
    """A ``run(batches)`` for a :class:`_Setting`, translating with CTranslate2: one translator at the current torch
    thread count, or ``translators`` of one thread each that take parts of each batch at the same time
    (``inter_threads``; as the fast generator's sentence shards)."""
    import ctranslate2

    sources = _ct2_sources(work)
    by_threads = {}
    # fairseq's limit is per batch (a * its source length + b); CTranslate2 takes one for the whole call
    max_length = int(work.max_len_a * max(len(tokens) + 1 for _, tokens in sources) + work.max_len_b)

    def run(batches: Sequence[dict]) -> Tuple[float, int, Dict[int, str]]:
        threads = torch.get_num_threads() if translators == 1 else 1
        if threads not in by_threads:
            by_threads[threads] = ctranslate2.Translator(str(model_dir), device="cpu", inter_threads=translators,
                                                         intra_threads=threads)
        chosen = sources[: sum(len(batch["id"]) for batch in batches)]
        start = time.perf_counter()
        results = by_threads[threads].translate_batch(
            [tokens for _, tokens in chosen], beam_size=work.beam, max_batch_size=-(-work.batch_size // translators),
            max_decoding_length=max_length,
        )
        seconds = time.perf_counter() - start
        hypotheses, tokens = {}, 0
        for (sample_id, _), result in zip(chosen, results):
            pieces = result.hypotheses[0]
            tokens += len(pieces) + 1  # + EOS, as fairseq counts its hypotheses
            text = " ".join(pieces)
            hypotheses[sample_id] = data_utils.post_process(text, args.remove_bpe) if args.remove_bpe else text
        return seconds, tokens, hypotheses

    return run


def _settings(args, work: Workload, tmp: Path, progress: Callable[[str], None]) -> List[_Setting]:
    """Every system of ``args.systems`` (stock first) that can run here, at each of its thread counts."""
    fairseq_systems = ["stock"] + [s for s in args.systems if s in FAIRSEQ_SYSTEMS and s != "stock"]
    if work.int8_model is None and any(s in INT8_LINEAR_SYSTEMS for s in fairseq_systems):
        if _is_compressed(args.path):
            reason = (f"its task {type(work.task).__name__} runs the compressed checkpoint in float32 (--task "
                      "translation_accel, speech: speech_to_text_accel, runs its int8 layers)")
        else:
            reason = "the checkpoint has no int8 layers (make one with fairseq-accel-compress --data ...)"
        progress(f"skipping {' '.join(INT8_LINEAR_SYSTEMS)}: {reason}")
        fairseq_systems = [s for s in fairseq_systems if s not in INT8_LINEAR_SYSTEMS]
    settings = []
    for system in fairseq_systems:
        generator = _fairseq_generator(work, system)
        run = lambda batches, generator=generator: _run_fairseq(work, generator, batches)  # noqa: E731
        by_sentence = getattr(generator, "sentence_parallel", None) is not None and work.batch_size > 1
        settings += [_Setting(system, threads, run, generator, by_sentence and threads > 1) for threads in args.threads]
    ct2_systems = [s for s in args.systems if s in CT2_SYSTEMS]
    reason = _ct2_unavailable(args, work) if ct2_systems else None
    if reason:
        progress(f"skipping {' '.join(ct2_systems)}: {reason}")
        ct2_systems = []
    for system in ct2_systems:
        model_dir = _ct2_convert(args, work, CT2_SYSTEMS[system], tmp)
        run = _ct2_runner(args, work, model_dir)
        settings += [_Setting(system, threads, run) for threads in args.ct2_threads]
        settings += [_Setting(system, count, _ct2_runner(args, work, model_dir, count), by_sentence=True)
                     for count in args.ct2_translators if count > 1 and work.batch_size > 1]
    return settings


def rows_for_batch_size(args, work: Workload, tmp: Path, progress: Callable[[str], None]) -> List[Row]:
    """One row per system: its best thread count after all settings took their turns."""
    settings = _settings(args, work, tmp, progress)
    _measure_in_turn(settings, work, args.repeats, progress)
    sentences = sum(len(batch["id"]) for batch in work.batches)
    rows = []
    for system in dict.fromkeys(s.system for s in settings):
        best = min((s for s in settings if s.system == system), key=lambda s: s.median_seconds)
        _, tokens, hypotheses = best.passes[0]
        rows.append(Row(system, best.threads, work.batch_size, work.beam, sentences, tokens, best.median_seconds,
                        work.score_name, _score(work, hypotheses), best.first_batch_seconds, best.peak_rss_mb,
                        *(_cache_bytes(best.generator) if best.generator is not None else (None, None)),
                        work.audio_seconds, best.by_sentence))
    return rows


def run_benchmark(args: argparse.Namespace,
                  progress: Callable[[str], None]) -> Tuple[List[Row], Optional[torch.nn.Module]]:
    """Every system of ``args.systems`` at every ``args.batch_sizes``, ``ratio`` filled in against stock; and
    the model with int8 layers (None where the checkpoint has none)."""
    if min(args.beam, args.repeats, *args.batch_sizes, *args.threads, *args.ct2_threads, *args.ct2_translators) < 1:
        raise BenchmarkError("--beam, --repeats, --batch-sizes, --threads, --ct2-threads and --ct2-translators must be "
                             "positive")
    if args.ct2_from is not None and not Path(args.ct2_from).is_file():
        raise BenchmarkError(f"--ct2-from {args.ct2_from}: no such checkpoint")
    task, models = load_checkpoint(args, args.task)
    int8 = take_int8_model(task, models, args.int8_min_weights)
    task.load_dataset(args.gen_subset)  # once: every batch size batches the same sentences
    rows: List[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        for batch_size in args.batch_sizes:
            work = build_workload(args, batch_size, task, models, int8)
            batch_rows = rows_for_batch_size(args, work, Path(tmp), progress)
            stock_speed = batch_rows[0].tokens_per_second
            for row in batch_rows:
                row.ratio = row.tokens_per_second / stock_speed
            rows += batch_rows
    return rows, int8


@dataclass
class GemmRow:
    layer: str
    shape: str  # in x out
    rows: int
    threads: int
    float_us: float
    int8_us: float
    int8_at_decode: bool  # whether the w8a8 systems run this layer in int8 (--int8-min-weights)

    @property
    def speedup(self) -> float:
        return self.float_us / self.int8_us


def _time_call(call: Callable[[], torch.Tensor], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - start) / calls * 1e6


def int8_gemm_rows(model: torch.nn.Module, row_counts: Sequence[int], threads: Sequence[int],
                   repeats: int = 5) -> List[GemmRow]:
    """Each distinct linear layer shape of the decoder (output projection included) as an int8 layer on its
    own per-row levels against ``F.linear`` in float32, at ``row_counts`` rows; the median of ``repeats``
    rounds taken in turn (float, int8, float, ...)."""
    layers: Dict[Tuple[int, int], Tuple[str, torch.nn.Module]] = {}
    for name, module in model.decoder.named_modules():
        if isinstance(module, (torch.nn.Linear, Int8Linear)):
            layers.setdefault((module.in_features, module.out_features), (f"decoder.{name}", module))
    rows = []
    for count in threads:
        torch.set_num_threads(count)
        for (columns, outputs), (name, layer) in layers.items():
            weight, bias = layer.weight.detach().contiguous(), layer.bias
            int8 = Int8Linear.from_linear(layer, 8, 0.05)
            for row_count in row_counts:
                x = torch.randn(row_count, columns)
                calls = max(5, 20000 // max(1, row_count * columns * outputs // 100000))
                float_call, int8_call = (lambda: F.linear(x, weight, bias)), (lambda: int8(x))
                float_call(), int8_call()  # warm-up (the backends pick kernels on the first call)
                times = [(_time_call(float_call, calls), _time_call(int8_call, calls)) for _ in range(repeats)]
                rows.append(GemmRow(name, f"{columns}x{outputs}", row_count, count,
                                    statistics.median(t[0] for t in times), statistics.median(t[1] for t in times),
                                    isinstance(layer, Int8Linear)))
    return rows
