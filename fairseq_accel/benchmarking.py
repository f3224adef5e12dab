"""Decoding speed of one checkpoint under several generators, side by side (``fairseq-accel-benchmark``).

Every system decodes the same batches of the same subset in one process: fairseq's ``SequenceGenerator``
(stock), the fast generator with an fp32 and an int8 key/value cache, and for a stock ``transformer``
checkpoint CTranslate2 float32/int8 through its fairseq converter (when ``ctranslate2`` is installed).
Each system runs at every thread count (after a warm-up pass) and ``repeats`` times; a row holds its best
thread count, the median time, tokens per second, the ratio to stock at the same batch size, and BLEU
(translation) or WER (speech) of what it produced. Timing covers ``generate`` only (the encoder
included), not data loading or scoring. This machine's noise is why the numbers are ratios measured in
one run: compare rows, not runs.
"""
import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import fairseq_accel  # noqa: F401  (registers the plugin, makes checkpoints load)
from fairseq import checkpoint_utils
from fairseq.data import data_utils
from fairseq.dataclass.configs import GenerationConfig

from fairseq_accel.tasks.accel_generation import AccelGenerationConfig, build_accel_generator
# system -> fast generator options (None: fairseq's SequenceGenerator)
FAIRSEQ_SYSTEMS = {
    "stock": None,
    "fast": {"kv_cache_dtype": "fp32"},
    "fast-fp16": {"kv_cache_dtype": "fp16"},
    "fast-int8": {"kv_cache_dtype": "int8"},
    "fast-int8-channel": {"kv_cache_dtype": "int8", "key_scale": "channel"},
    "fast-int8-cross": {"kv_cache_dtype": "int8", "quantize_cross_kv": True},
}
CT2_SYSTEMS = {"ct2-float32": "float32", "ct2-int8": "int8"}
DEFAULT_SYSTEMS = ["stock", "fast", "fast-int8", "fast-int8-cross", "ct2-float32", "ct2-int8"]


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
    self_kv_bytes: Optional[int] = None  # per decoded sentence, all beams (fast generator only)
    cross_kv_bytes: Optional[int] = None
    ratio: float = field(default=float("nan"))

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds


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


def load_checkpoint(args) -> Tuple[object, List[torch.nn.Module]]:
    if not Path(args.path).is_file():
        raise BenchmarkError(f"--path {args.path}: no such checkpoint")
    if not Path(args.data).is_dir():
        raise BenchmarkError(f"data directory {args.data} does not exist")
    overrides = {"data": args.data, "config_yaml": args.config_yaml}
    models, _cfg, task = checkpoint_utils.load_model_ensemble_and_task([args.path], arg_overrides=overrides)
    for model in models:
        model.eval()
    return task, models


def build_workload(args, batch_size: int, task, models) -> Workload:
    dataset = task.dataset(args.gen_subset)
    limit = min(len(dataset), args.max_sentences or len(dataset))
    indices = list(range(limit))
    batches = [dataset.collater([dataset[i] for i in indices[start : start + batch_size]])
               for start in range(0, limit, batch_size)]
    batches = [batch for batch in batches if batch]
    tgt_dict = task.target_dictionary
    bpe = task.build_bpe(argparse.Namespace(bpe=None)) if hasattr(task, "data_cfg") else None

    def to_text(tokens: torch.Tensor) -> str:
        text = tgt_dict.string(tokens.int().cpu(), args.remove_bpe, extra_symbols_to_ignore={tgt_dict.eos()})
        return bpe.decode(text) if bpe is not None else text

    references = {}
    for batch in batches:
        for sample_id, target in zip(batch["id"].tolist(), batch["target"]):
            references[sample_id] = to_text(target[target.ne(tgt_dict.pad())])
    score_name = "WER" if hasattr(task, "data_cfg") else "BLEU"
    return Workload(task, models, batches, references, to_text, score_name, args.beam, batch_size,
                    args.max_len_a, args.max_len_b)


def _score(work: Workload, hypotheses: Dict[int, str]) -> float:
    ids = sorted(work.references)
    refs, hyps = [work.references[i] for i in ids], [hypotheses.get(i, "") for i in ids]
    if work.score_name == "WER":
        import jiwer

        return 100.0 * jiwer.wer(refs, hyps)
    import sacrebleu

    return sacrebleu.corpus_bleu(hyps, [refs]).score


def _fairseq_generator(work: Workload, system: str):
    gen_cfg = GenerationConfig(beam=work.beam, max_len_a=work.max_len_a, max_len_b=work.max_len_b)
    stock = work.task.build_generator(work.models, gen_cfg)
    options = FAIRSEQ_SYSTEMS[system]
    if options is None:
        return stock
    accel = AccelGenerationConfig(accel_generator="fast", no_accel_fallback=True, **options)
    return build_accel_generator(stock, work.models, accel)


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


def _measure(run: Callable[[Sequence[dict]], Tuple[float, int, Dict[int, str]]], work: Workload, threads: Sequence[int], repeats: int):
    """Best thread count's (median seconds, tokens, hypotheses)."""
    best = None
    for count in threads:
        torch.set_num_threads(count)
        run(work.batches[:2])  # warm-up
        passes = [run(work.batches) for _ in range(repeats)]
        seconds = statistics.median(p[0] for p in passes)
        if best is None or seconds < best[1]:
            best = (count, seconds, passes[0][1], passes[0][2])
    return best


def _ct2_sources(work: Workload) -> List[Tuple[int, List[str]]]:
    """(sample id, source subword strings without EOS) in batch order: what CTranslate2 translates."""
    src_dict = work.task.source_dictionary
    sources = []
    for batch in work.batches:
        for sample_id, src in zip(batch["id"].tolist(), batch["net_input"]["src_tokens"]):
            keep = src.ne(src_dict.pad()) & src.ne(src_dict.eos())
            sources.append((sample_id, [src_dict[i] for i in src[keep].tolist()]))
    return sources


def _ct2_unavailable(work: Workload) -> Optional[str]:
    try:
        import ctranslate2  # noqa: F401
    except ImportError:
        return "ctranslate2 is not installed (pip install ctranslate2)"
    if type(work.models[0]).__name__ != "TransformerModel":
        return f"CTranslate2 converts stock fairseq transformer models, not {type(work.models[0]).__name__}"
    return None


def _ct2_convert(args, work: Workload, quantization: str, directory: Path) -> Path:
    """The checkpoint converted by CTranslate2's fairseq converter (once per quantization).

    The converter calls ``torch.load`` on the checkpoint itself; it is routed through the plugin's
    checked loader, so the checkpoint's allowlist and trust apply as for fairseq's own loads.
    """
    from ctranslate2.converters import FairseqConverter

    from fairseq_accel.compat.checkpoint_loading import torch_load_through_checks

    target = directory / quantization
    if not target.exists():
        cfg = work.task.cfg
        converter = FairseqConverter(args.path, args.data, source_lang=cfg.source_lang, target_lang=cfg.target_lang)
        with torch_load_through_checks():
            converter.convert(str(target), quantization=quantization)
    return target


def _ct2_runner(args, work: Workload, model_dir: Path):
    """A ``run(batches)`` for ``_measure`` translating with CTranslate2 at the current torch thread count."""
    import ctranslate2

    sources = _ct2_sources(work)
    translators = {}
    # fairseq's limit is per batch (a * its source length + b); CTranslate2 takes one for the whole call
    max_length = int(work.max_len_a * max(len(tokens) + 1 for _, tokens in sources) + work.max_len_b)

    def run(batches: Sequence[dict]) -> Tuple[float, int, Dict[int, str]]:
        threads = torch.get_num_threads()
        if threads not in translators:
            translators[threads] = ctranslate2.Translator(str(model_dir), device="cpu", inter_threads=1, intra_threads=threads)
        chosen = sources[: sum(len(batch["id"]) for batch in batches)]
        start = time.perf_counter()
        results = translators[threads].translate_batch(
            [tokens for _, tokens in chosen], beam_size=work.beam, max_batch_size=work.batch_size,
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


def rows_for_batch_size(args, work: Workload, tmp: Path, progress: Callable[[str], None]) -> List[Row]:
    rows = []
    fairseq_systems = ["stock"] + [s for s in args.systems if s in FAIRSEQ_SYSTEMS and s != "stock"]
    sentences = sum(len(batch["id"]) for batch in work.batches)
    for system in fairseq_systems:
        progress(f"{system}, batch {work.batch_size}, threads {args.threads}")
        generator = _fairseq_generator(work, system)
        threads, seconds, tokens, hypotheses = _measure(
            lambda batches: _run_fairseq(work, generator, batches), work, args.threads, args.repeats
        )
        rows.append(Row(system, threads, work.batch_size, work.beam, sentences, tokens, seconds, work.score_name,
                        _score(work, hypotheses), *_cache_bytes(generator)))
    ct2_systems = [s for s in args.systems if s in CT2_SYSTEMS]
    reason = _ct2_unavailable(work) if ct2_systems else None
    if reason:
        progress(f"skipping {' '.join(ct2_systems)}: {reason}")
        return rows
    for system in ct2_systems:
        progress(f"{system}, batch {work.batch_size}, threads {args.threads}")
        run = _ct2_runner(args, work, _ct2_convert(args, work, CT2_SYSTEMS[system], tmp))
        threads, seconds, tokens, hypotheses = _measure(run, work, args.ct2_threads, args.repeats)
        rows.append(Row(system, threads, work.batch_size, work.beam, sentences, tokens, seconds, work.score_name,
                        _score(work, hypotheses)))
    return rows


def run_benchmark(args: argparse.Namespace, progress: Callable[[str], None]) -> List[Row]:
    """Every system of ``args.systems`` at every ``args.batch_sizes``; ``ratio`` filled in against stock."""
    if min(args.beam, args.repeats, *args.batch_sizes, *args.threads, *args.ct2_threads) < 1:
        raise BenchmarkError("--beam, --repeats, --batch-sizes, --threads and --ct2-threads must be positive")
    task, models = load_checkpoint(args)
    task.load_dataset(args.gen_subset)  # once: every batch size batches the same sentences
    rows: List[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        for batch_size in args.batch_sizes:
            work = build_workload(args, batch_size, task, models)
            batch_rows = rows_for_batch_size(args, work, Path(tmp), progress)
            stock_speed = batch_rows[0].tokens_per_second
            for row in batch_rows:
                row.ratio = row.tokens_per_second / stock_speed
            rows += batch_rows
    return rows
