"""``fairseq-accel-compress``: a trained (or compression-fine-tuned) fairseq checkpoint as a compressed
checkpoint (fairseq_accel/compression/compressed_format.py) that ``fairseq-generate --user-dir user_dir``
decodes directly, and ``--inspect`` to print what a compressed checkpoint holds.

Every 2-D weight (linear layers, embeddings, output projection) is stored as per-row int8 (or int4)
levels, only the non-zero ones with a 1-bit mask where the weight is sparse enough for that to be smaller;
biases, norms and convolution kernels stay float32; tied and shared tensors are stored once.
"""
import argparse
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Pattern, Sequence

import fairseq_accel  # noqa: F401  (safe checkpoint loading; the compressed-checkpoint reader)
from fairseq_accel.compat.checkpoint_files import COMPRESSED_KEY, CheckpointLoadError, write_checkpoint
from fairseq_accel.compat.checkpoint_loading import read_checkpoint
from fairseq_accel.compression.compressed_format import (
    CompressedFormatError,
    SizeRow,
    check_version,
    compress_model_state,
    size_rows,
)
from fairseq_accel.tasks.compression_training import COMPRESSION_KEY

PROG = "fairseq-accel-compress"

EXAMPLES = """examples:
  # int8 weights (sparse ones with a bitmask), e.g. of a 50 %-sparsity fine-tune (egs/*/run.sh stage 8)
  fairseq-accel-compress --path exp/lite/checkpoints/checkpoint_last.pt --out exp/lite/compressed.pt
  # the output projection and embeddings in int4, the rest int8
  fairseq-accel-compress --path ckpt.pt --out small.pt --int4 "embed_tokens|output_projection"
  # what a compressed checkpoint holds: bytes per tensor and the ratio to fp32
  fairseq-accel-compress --inspect exp/lite/compressed.pt
  # decode it like any checkpoint
  fairseq-generate data-bin --user-dir user_dir --path exp/lite/compressed.pt --beam 5"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write a compressed copy of a fairseq checkpoint: per-row symmetric int8 (or int4) weights, "
                    "1-bit masks for sparse weights, float32 for small tensors; fairseq-generate --user-dir "
                    "user_dir decodes it (weights expanded to float32).")
    parser.add_argument("--path", type=Path, help="the fairseq checkpoint to compress")
    parser.add_argument("--out", type=Path, help="the compressed checkpoint to write")
    parser.add_argument("--int4", type=re.compile, metavar="REGEX",
                        help="2-D weights whose name matches REGEX get 4-bit levels (default: none; all int8)")
    parser.add_argument("--keep-float", type=re.compile, metavar="REGEX",
                        help="weights whose name matches REGEX stay float32 (e.g. the most sensitive layers)")
    parser.add_argument("--inspect", type=Path, metavar="COMPRESSED",
                        help="print the bytes of every tensor of a compressed checkpoint and exit")
    parser.add_argument("--top", type=int, default=12, help="largest tensors listed in the size table (default 12)")
    return parser


def _bits_chooser(int4: Optional[Pattern[str]], keep_float: Optional[Pattern[str]]):
    def bits_of(name: str, tensor: Any) -> Optional[int]:
        if keep_float is not None and keep_float.search(name):
            return None
        return 4 if int4 is not None and int4.search(name) else 8
    return bits_of


def format_size_table(rows: Sequence[SizeRow], top: int) -> str:
    """The ``top`` largest tensors and the totals, with the ratio of fp32 bytes to stored bytes."""
    lines = [f"{'tensor':<52} {'shape':>12} {'stored as':>10} {'sparsity':>8} {'bytes':>11} {'fp32 bytes':>11}"]
    for row in sorted(rows, key=lambda r: r.fp32_nbytes, reverse=True)[:top]:
        shape = "x".join(map(str, row.shape))
        lines.append(f"{row.name:<52} {shape:>12} {row.storage:>10} {row.sparsity:>8.3f} {row.nbytes:>11,} "
                     f"{row.fp32_nbytes:>11,}")
    stored, fp32 = sum(r.nbytes for r in rows), sum(r.fp32_nbytes for r in rows)
    if len(rows) > top:
        lines.append(f"... {len(rows) - top} smaller tensors")
    lines.append(f"total: {stored:,} bytes, fp32 {fp32:,} bytes: {fp32 / max(stored, 1):.2f}x smaller "
                 "(every parameter, embeddings included; shared tensors once)")
    return "\n".join(lines)


def _compressed_state(source: Path, state: Dict[str, Any], args: argparse.Namespace) -> Dict[str, Any]:
    if COMPRESSED_KEY in state:
        raise CompressedFormatError(f"{source} is already compressed; compress the original checkpoint instead")
    if not isinstance(state.get("model"), dict):
        raise CompressedFormatError(f"{source}: not a fairseq checkpoint (no 'model' state)")
    compressed = {key: value for key, value in state.items() if key not in ("model", "last_optimizer_state")}
    task_state = dict(state.get("task_state") or {})
    task_state.pop(COMPRESSION_KEY, None)  # masks and importance sums: the zeros of the weights say it all
    compressed["task_state"] = task_state
    compressed[COMPRESSED_KEY] = compress_model_state(state["model"], _bits_chooser(args.int4, args.keep_float))
    return compressed


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); a checkpoint that cannot be compressed or
    read is one ``fairseq-accel-compress: error:`` line and exit status 2."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.inspect is None and (args.path is None or args.out is None):
        parser.error("give --path and --out to compress, or --inspect COMPRESSED")
    try:
        if args.inspect is not None:
            state = read_checkpoint(str(args.inspect))
            if COMPRESSED_KEY not in state:
                raise CompressedFormatError(f"{args.inspect} is not a compressed checkpoint (no {COMPRESSED_KEY} "
                                            f"section); make one with {PROG} --path CKPT --out COMPRESSED")
            check_version(state[COMPRESSED_KEY], str(args.inspect))
            print(format_size_table(size_rows(state[COMPRESSED_KEY]), args.top))
            return 0
        compressed = _compressed_state(args.path, read_checkpoint(str(args.path)), args)
        write_checkpoint(compressed, args.out)
    except (CompressedFormatError, CheckpointLoadError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    print(format_size_table(size_rows(compressed[COMPRESSED_KEY]), args.top))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
