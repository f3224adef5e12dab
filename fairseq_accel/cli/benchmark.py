"""``fairseq-accel-benchmark``: decoding speed of one checkpoint under several generators, side by side.

Every system decodes the same batches of the same subset in one process: fairseq's ``SequenceGenerator``
(stock), the fast generator with an fp32 and an int8 key/value cache, and for a stock ``transformer``
checkpoint CTranslate2 float32/int8 through its fairseq converter (when ``ctranslate2`` is installed).
Each system runs at every ``--threads`` count (after a warm-up pass) and ``--repeats`` times; the table
shows its best thread count, the median time, tokens per second, the ratio to stock at the same batch
size, and BLEU (translation) or WER (speech) of what it produced. Timing covers ``generate`` only (the
encoder included), not data loading or scoring. This machine's noise is why the numbers are ratios
measured in one run: compare rows, not runs.
"""
import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import fairseq_accel  # noqa: F401  (registers the plugin, makes checkpoints load)
from fairseq import checkpoint_utils
from fairseq.data import data_utils
from fairseq.dataclass.configs import GenerationConfig

from fairseq_accel.tasks.accel_generation import AccelGenerationConfig, build_accel_generator

PROG = "fairseq-accel-benchmark"
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  fairseq-accel-benchmark egs/mini_l10n/nmt/data/bin_unigram8000 \\\n"
        "    --path egs/mini_l10n/nmt/exp/transformer_mini/checkpoints/checkpoint_best.pt \\\n"
        "    --remove-bpe sentencepiece --batch-sizes 1 32",
    )
    parser.add_argument("data", help="the data directory fairseq-generate would get (binarized text or S2T manifests)")
    parser.add_argument("--path", required=True, help="checkpoint to decode with")
    parser.add_argument("--gen-subset", default="test", help="subset to decode (default: test)")
    parser.add_argument("--config-yaml", default="config.yaml", help="speech_to_text data config (default: config.yaml)")
    parser.add_argument("--systems", nargs="+", default=DEFAULT_SYSTEMS,
                        choices=[*FAIRSEQ_SYSTEMS, *CT2_SYSTEMS], help="systems to compare (stock always runs: ratios need it)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32], help="sentences per batch (default: 1 32)")
    parser.add_argument("--beam", type=int, default=5, help="beam size (default: 5)")
    parser.add_argument("--max-len-a", type=float, default=0, help="as fairseq-generate's (default: 0)")
    parser.add_argument("--max-len-b", type=int, default=200,
                        help="as fairseq-generate's: outputs stop at a * source length + b tokens (default: 200)")
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2],
                        help="thread counts to try for the fairseq systems; the best is reported (default: 1 2)")
    parser.add_argument("--ct2-threads", nargs="+", type=int, default=[1],
                        help="CTranslate2 intra_threads to try (default: 1; with 2 it is 5-10x slower on 2-vCPU machines)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per setting; the median is reported (default: 3)")
    parser.add_argument("--max-sentences", type=int, help="decode only the first N sentences of the subset")
    parser.add_argument("--remove-bpe", default=None, help="post-processing before scoring, as fairseq-generate's (e.g. sentencepiece)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    return parser


def _load(args) -> Tuple[object, List[torch.nn.Module]]:
    if not Path(args.path).is_file():
        raise BenchmarkError(f"--path {args.path}: no such checkpoint")
    if not Path(args.data).is_dir():
        raise BenchmarkError(f"data directory {args.data} does not exist")
    overrides = {"data": args.data, "config_yaml": args.config_yaml}
    models, _cfg, task = checkpoint_utils.load_model_ensemble_and_task([args.path], arg_overrides=overrides)
    for model in models:
        model.eval()
    return task, models


def _workload(args, batch_size: int, task, models) -> Workload:
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
    if not stats or not stats["sentences"]:
        return None, None
    return tuple(round(stats[f"{kind}_bytes"] / stats["sentences"]) for kind in ("self_attention", "cross_attention"))


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
    """The checkpoint converted by CTranslate2's fairseq converter (once per quantization)."""
    from ctranslate2.converters import FairseqConverter

    target = directory / quantization
    if not target.exists():
        cfg = work.task.cfg
        FairseqConverter(args.path, args.data, source_lang=cfg.source_lang, target_lang=cfg.target_lang).convert(
            str(target), quantization=quantization
        )
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


def _rows_for_batch_size(args, work: Workload, tmp: Path) -> List[Row]:
    rows = []
    fairseq_systems = ["stock"] + [s for s in args.systems if s in FAIRSEQ_SYSTEMS and s != "stock"]
    sentences = sum(len(batch["id"]) for batch in work.batches)
    for system in fairseq_systems:
        print(f"{PROG}: {system}, batch {work.batch_size}, threads {args.threads}", file=sys.stderr, flush=True)
        generator = _fairseq_generator(work, system)
        threads, seconds, tokens, hypotheses = _measure(
            lambda batches: _run_fairseq(work, generator, batches), work, args.threads, args.repeats
        )
        rows.append(Row(system, threads, work.batch_size, work.beam, sentences, tokens, seconds, work.score_name,
                        _score(work, hypotheses), *_cache_bytes(generator)))
    ct2_systems = [s for s in args.systems if s in CT2_SYSTEMS]
    reason = _ct2_unavailable(work) if ct2_systems else None
    if reason:
        print(f"{PROG}: skipping {' '.join(ct2_systems)}: {reason}", file=sys.stderr)
        return rows
    for system in ct2_systems:
        print(f"{PROG}: {system}, batch {work.batch_size}, threads {args.threads}", file=sys.stderr, flush=True)
        run = _ct2_runner(args, work, _ct2_convert(args, work, CT2_SYSTEMS[system], tmp))
        threads, seconds, tokens, hypotheses = _measure(run, work, args.ct2_threads, args.repeats)
        rows.append(Row(system, threads, work.batch_size, work.beam, sentences, tokens, seconds, work.score_name,
                        _score(work, hypotheses)))
    return rows


def format_table(rows: List[Row]) -> str:
    header = ("| system | threads | batch | beam | sentences | tokens | seconds | tokens/s | x stock | {score} | "
              "self-attn KV bytes/sent | cross-attn KV bytes/sent |")
    lines = [header.format(score=rows[0].score_name if rows else "score"), "|---" * 12 + "|"]
    for row in rows:
        caches = " | ".join("" if size is None else f"{size:,}" for size in (row.self_kv_bytes, row.cross_kv_bytes))
        lines.append(
            f"| {row.system} | {row.threads} | {row.batch} | {row.beam} | {row.sentences} | {row.tokens} | "
            f"{row.seconds:.2f} | {row.tokens_per_second:,.0f} | {row.ratio:.2f} | {row.score:.2f} | {caches} |"
        )
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.getLogger("fairseq").setLevel(logging.WARNING)
    try:
        if min(args.beam, args.repeats, *args.batch_sizes, *args.threads, *args.ct2_threads) < 1:
            raise BenchmarkError("--beam, --repeats, --batch-sizes, --threads and --ct2-threads must be positive")
        task, models = _load(args)
        task.load_dataset(args.gen_subset)  # once: every batch size batches the same sentences
        rows: List[Row] = []
        with tempfile.TemporaryDirectory() as tmp:
            for batch_size in args.batch_sizes:
                work = _workload(args, batch_size, task, models)
                batch_rows = _rows_for_batch_size(args, work, Path(tmp))
                stock_speed = batch_rows[0].tokens_per_second
                for row in batch_rows:
                    row.ratio = row.tokens_per_second / stock_speed
                rows += batch_rows
    except (BenchmarkError, ValueError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([{**asdict(r), "tokens_per_second": r.tokens_per_second} for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
