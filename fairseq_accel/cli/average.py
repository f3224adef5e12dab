"""``fairseq-accel-average``: one checkpoint whose weights are the mean of the last N checkpoints of a run.

The options are those of fairseq's ``scripts/average_checkpoints.py`` (which the pip package does not
ship, and which cannot read checkpoints under torch >= 2.6); reading goes through the plugin's safe loader.
"""
import argparse
import sys
from pathlib import Path
from typing import List, Optional

from fairseq_accel.checkpoint_averaging import CheckpointAveragingError, average_checkpoints, last_checkpoints
from fairseq_accel.compat.checkpoint_files import CheckpointLoadError, write_checkpoint

PROG = "fairseq-accel-average"

EXAMPLES = """examples:
  # the last 10 epoch checkpoints (fairseq-train --keep-last-epochs 10) of exp/lsra/checkpoints
  fairseq-accel-average --inputs exp/lsra/checkpoints --num-epoch-checkpoints 10 --output exp/lsra/checkpoints/checkpoint_average.pt
  # the last 5 update-interval checkpoints (--save-interval-updates 100 --keep-interval-updates 5)
  fairseq-accel-average --inputs exp/lsra/checkpoints --num-update-checkpoints 5 --output avg.pt
  # given files
  fairseq-accel-average --inputs ckpt/checkpoint8.pt ckpt/checkpoint9.pt ckpt/checkpoint10.pt --output avg.pt
The output decodes like any checkpoint: fairseq-generate DATA --user-dir user_dir --path avg.pt ..."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Average the weights of the last N checkpoints of one fairseq training run (the Lite "
                    "Transformer paper evaluates the average of the last 10). The output keeps the newest "
                    "checkpoint's configuration and training state.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", nargs="+", required=True, metavar="PATH",
                        help="checkpoint files, or one folder of checkpoints with --num-epoch-checkpoints or "
                             "--num-update-checkpoints")
    parser.add_argument("--output", required=True, type=Path, help="the averaged checkpoint to write")
    count = parser.add_mutually_exclusive_group()
    count.add_argument("--num-epoch-checkpoints", type=int, metavar="N",
                       help="average the last N checkpoint<epoch>.pt of the folder")
    count.add_argument("--num-update-checkpoints", type=int, metavar="N",
                       help="average the last N checkpoint_<epoch>_<update>.pt of the folder")
    parser.add_argument("--checkpoint-upper-bound", type=int, metavar="K",
                        help="leave out checkpoints after epoch (or update) K")
    return parser


def _inputs(args: argparse.Namespace, parser: argparse.ArgumentParser) -> List[Path]:
    by_update = args.num_update_checkpoints is not None
    count = args.num_update_checkpoints if by_update else args.num_epoch_checkpoints
    if count is None:
        if args.checkpoint_upper_bound is not None:
            parser.error("--checkpoint-upper-bound needs --num-epoch-checkpoints or --num-update-checkpoints")
        return [Path(path) for path in args.inputs]
    if len(args.inputs) != 1:
        parser.error(f"with --num-epoch-checkpoints/--num-update-checkpoints, --inputs is one folder; got "
                     f"{len(args.inputs)} paths")
    return last_checkpoints(Path(args.inputs[0]), count, by_update, args.checkpoint_upper_bound)


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); a checkpoint that cannot be averaged is
    one ``fairseq-accel-average: error:`` line and exit status 2."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        paths = _inputs(args, parser)
        state = average_checkpoints(paths, progress=lambda line: print(f"{PROG}: {line}", file=sys.stderr))
        write_checkpoint(state, args.output)
    except (CheckpointAveragingError, CheckpointLoadError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    print(f"averaged {len(paths)} checkpoints ({paths[0].name} ... {paths[-1].name}) into {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
