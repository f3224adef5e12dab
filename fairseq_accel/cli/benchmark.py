"""``fairseq-accel-benchmark``: the command line of :mod:`fairseq_accel.benchmarking` (its docstring is the help)."""
import argparse
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional

from fairseq_accel import benchmarking
from fairseq_accel.benchmarking import (
    CT2_SYSTEMS,
    DEFAULT_SYSTEMS,
    FAIRSEQ_SYSTEMS,
    BenchmarkError,
    GemmRow,
    Row,
    int8_gemm_rows,
    run_benchmark,
)
from fairseq_accel.inference.int8_execution import INT8_MIN_WEIGHTS

PROG = "fairseq-accel-benchmark"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=benchmarking.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  fairseq-accel-benchmark egs/mini_l10n/nmt/data/bin_unigram8000 \\\n"
        "    --path egs/mini_l10n/nmt/exp/transformer_mini/checkpoints/checkpoint_best.pt \\\n"
        "    --remove-bpe sentencepiece --batch-sizes 1 32",
    )
    parser.add_argument("data", help="the data directory fairseq-generate would get (binarized text or S2T manifests)")
    parser.add_argument("--path", required=True, help="checkpoint to decode with")
    parser.add_argument("--task", help="load the checkpoint under this task instead of the one it was trained with: "
                        "a compressed checkpoint of a model trained under a stock task runs its int8 layers under "
                        "translation_accel (speech: speech_to_text_accel)")
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
    parser.add_argument("--ct2-from", metavar="FLOAT_CHECKPOINT",
                        help="the float checkpoint CTranslate2 converts, where --path is a compressed checkpoint made "
                             "from it (default: --path)")
    parser.add_argument("--ct2-threads", nargs="+", type=int, default=[1],
                        help="CTranslate2 intra_threads to try (default: 1; with 2 it is 5-10x slower on 2-vCPU machines)")
    parser.add_argument("--ct2-translators", nargs="+", type=int, default=[1, 2],
                        help="CTranslate2 inter_threads to try besides: N translators of one thread each take 1/N of "
                             "each batch at the same time, as the fast generator's sentence shards (default: 1 2)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed passes per setting, the settings taking turns; the median is reported (default: 3)")
    parser.add_argument("--max-sentences", type=int, help="decode only the first N sentences of the subset")
    parser.add_argument("--remove-bpe", default=None, help="post-processing before scoring, as fairseq-generate's (e.g. sentencepiece)")
    parser.add_argument("--int8-min-weights", type=int, default=INT8_MIN_WEIGHTS,
                        help="fast-w8a8*: linear layers of at least this many weights run in int8, as "
                             f"fairseq-generate's option (default: {INT8_MIN_WEIGHTS:,})")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    return parser


def format_table(rows: List[Row]) -> str:
    speech = bool(rows) and rows[0].audio_seconds is not None
    header = ("| system | threads | batch | beam | {sentences} | tokens | seconds | tokens/s | {per_second}x stock | "
              "{score} | self-attn KV bytes/sent | cross-attn KV bytes/sent | first batch s | peak RSS MiB |")
    columns = 16 if speech else 14
    lines = [header.format(sentences="utterances" if speech else "sentences",
                           per_second="utterances/s | RTF | " if speech else "",
                           score=rows[0].score_name if rows else "score"), "|---" * columns + "|"]
    for row in rows:
        caches = " | ".join("" if size is None else f"{size:,}" for size in (row.self_kv_bytes, row.cross_kv_bytes))
        rss = "" if row.peak_rss_mb is None else f"{row.peak_rss_mb:,.0f}"
        per_second = f"{row.sentences_per_second:,.1f} | {row.real_time_factor:.4f} | " if speech else ""
        lines.append(
            f"| {row.system} | {row.threads}{' by sentence' if row.by_sentence else ''} | {row.batch} | {row.beam} | "
            f"{row.sentences} | {row.tokens} | "
            f"{row.seconds:.2f} | {row.tokens_per_second:,.0f} | {per_second}{row.ratio:.2f} | {row.score:.2f} | "
            f"{caches} | {row.first_batch_seconds:.2f} | {rss} |"
        )
    return "\n".join(lines)


def format_gemm_table(rows: List[GemmRow]) -> str:
    lines = ["| decoder layer (first of its shape) | in x out | rows | threads | fp32 us | int8 us | x fp32 | "
             "int8 in w8a8 |", "|---" * 8 + "|"]
    lines += [f"| {r.layer} | {r.shape} | {r.rows} | {r.threads} | {r.float_us:.1f} | {r.int8_us:.1f} | "
              f"{r.speedup:.2f} | {'yes' if r.int8_at_decode else 'no'} |" for r in rows]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.getLogger("fairseq").setLevel(logging.WARNING)
    progress = lambda message: print(f"{PROG}: {message}", file=sys.stderr, flush=True)  # noqa: E731
    try:
        rows, int8 = run_benchmark(args, progress)
    except (BenchmarkError, ValueError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    print(format_table(rows))
    if int8 is not None:
        progress("int8 GEMMs against float32 at the decoder's rows (batch x beam)")
        print()
        row_counts = sorted({size * args.beam for size in args.batch_sizes})
        print(format_gemm_table(int8_gemm_rows(int8, row_counts, args.threads)))
    if args.json:
        Path(args.json).write_text(json.dumps([{**asdict(r), "tokens_per_second": r.tokens_per_second,
                                                "sentences_per_second": r.sentences_per_second,
                                                "real_time_factor": r.real_time_factor} for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
