"""``fairseq-accel-benchmark-encoder``: a speech encoder with and without its batches' padding, side by side.

The plugin's speech encoders (s2t_sanm, s2t_lite_transformer) run their position-wise parts (projections, feed-forward, norms) on the valid frames
of a batch only (:mod:`fairseq_accel.modules.padding_removal`). This command measures what that buys on real
data: the subset's utterances are batched in manifest order (so a batch mixes lengths, as a decoding service
gets them, unlike fairseq's length-sorted batches), and every batch is encoded with the padding removed and
with the padded layout, taking turns (removed, padded, removed, ...), so that a change of the machine's load
falls on both alike. It prints one table: the share of padding among the frames the layers see, the median
time of each layout over ``--repeats`` passes, their ratio, the largest difference of the two at valid frames,
and the batch invariance of the padding-free encoder (largest difference between an utterance encoded in its
batch and alone, over the first batch).
"""
import argparse
import logging
import statistics
import sys
import time
from typing import Callable, List, Optional, Sequence

import torch

from fairseq_accel.benchmarking import BenchmarkError, load_checkpoint

PROG = "fairseq-accel-benchmark-encoder"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  fairseq-accel-benchmark-encoder egs/mini_espeak/asr/data/s2t \\\n"
        "    --path egs/mini_espeak/asr/exp/s2t_sanm_mini/checkpoints/checkpoint_best.pt --batch-size 32",
    )
    parser.add_argument("data", help="the speech_to_text data directory fairseq-generate would get (manifests)")
    parser.add_argument("--path", required=True, help="checkpoint of a model whose encoder removes padding (s2t_sanm, s2t_lite_transformer)")
    parser.add_argument("--gen-subset", default="test", help="subset to encode (default: test)")
    parser.add_argument("--config-yaml", default="config.yaml", help="speech_to_text data config (default: config.yaml)")
    parser.add_argument("--batch-size", type=int, default=32, help="utterances per batch, in manifest order (default: 32)")
    parser.add_argument("--max-sentences", type=int, help="encode only the first N utterances of the subset")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed passes per layout, the layouts taking turns; the median is reported (default: 5)")
    return parser


def speech_batches(args, task) -> List[dict]:
    """The subset's first ``--max-sentences`` utterances in manifest order, ``--batch-size`` per batch."""
    dataset = task.dataset(args.gen_subset)
    count = min(len(dataset), args.max_sentences or len(dataset))
    return [dataset.collater([dataset[i] for i in range(start, min(start + args.batch_size, count))])
            for start in range(0, count, args.batch_size)]


def padding_removing_encoder(model: torch.nn.Module) -> torch.nn.Module:
    """The model's encoder, if it can run without padding; else one clear error."""
    encoder = model.encoder
    if not hasattr(encoder, "remove_padding"):
        raise BenchmarkError(f"the encoder of {type(model).__name__} ({type(encoder).__name__}) has no padding-free "
                             "path; s2t_sanm's and s2t_lite_transformer's have")
    return encoder


def encode_all(encoder, batches: Sequence[dict], remove_padding: bool) -> List[torch.Tensor]:
    """Each batch's encoder output (time x batch x dim) with the given layout."""
    encoder.remove_padding = remove_padding
    with torch.no_grad():
        return [encoder(**{k: batch["net_input"][k] for k in ("src_tokens", "src_lengths")})["encoder_out"][0]
                for batch in batches]


def valid_frame_difference(encoder, batches: Sequence[dict], first: List[torch.Tensor], second: List[torch.Tensor]) -> float:
    """Largest |first - second| at the valid frames of every batch."""
    worst = 0.0
    for batch, a, b in zip(batches, first, second):
        lengths = encoder.frontend.output_length(batch["net_input"]["src_lengths"])
        for column, length in enumerate(lengths.tolist()):
            worst = max(worst, (a[:length, column] - b[:length, column]).abs().max().item())
    return worst


def batch_invariance(encoder, batch: dict, batched: torch.Tensor) -> float:
    """Largest difference between each utterance of ``batch`` encoded alone and in the batch."""
    features, lengths = batch["net_input"]["src_tokens"], batch["net_input"]["src_lengths"]
    alone = [encode_all(encoder, [{"net_input": {"src_tokens": features[i : i + 1, : lengths[i]],
                                                 "src_lengths": lengths[i : i + 1]}}], True)[0]
             for i in range(len(lengths))]
    return max((batched[: out.size(0), i] - out[:, 0]).abs().max().item() for i, out in enumerate(alone))


def padding_share(encoder, batches: Sequence[dict]) -> float:
    """Padded frames / all frames the encoder layers see."""
    valid = total = 0
    for batch in batches:
        lengths = encoder.frontend.output_length(batch["net_input"]["src_lengths"])
        valid += int(lengths.sum())
        total += int(lengths.max()) * len(lengths)
    return 1 - valid / total


def median_seconds_in_turn(runs: Sequence[Callable[[], object]], repeats: int) -> List[float]:
    """Each of ``runs`` timed ``repeats`` times, taking turns; their medians."""
    times: List[List[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for run, measured in zip(runs, times):
            start = time.perf_counter()
            run()
            measured.append(time.perf_counter() - start)
    return [statistics.median(measured) for measured in times]


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.getLogger("fairseq").setLevel(logging.WARNING)
    progress = lambda message: print(f"{PROG}: {message}", file=sys.stderr, flush=True)  # noqa: E731
    try:
        if min(args.batch_size, args.threads, args.repeats) < 1:
            raise BenchmarkError("--batch-size, --threads and --repeats must be positive")
        task, models = load_checkpoint(args)
        encoder = padding_removing_encoder(models[0])
        task.load_dataset(args.gen_subset)
    except (BenchmarkError, ValueError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    batches = speech_batches(args, task)
    removed, padded = encode_all(encoder, batches, True), encode_all(encoder, batches, False)  # also the warm-up
    progress(f"{len(batches)} batches of up to {args.batch_size} utterances, {args.repeats} passes per layout in turn")
    removed_s, padded_s = median_seconds_in_turn(
        [lambda: encode_all(encoder, batches, True), lambda: encode_all(encoder, batches, False)], args.repeats)
    utterances = sum(len(batch["id"]) for batch in batches)
    print("| utterances | batch | threads | padding % of frames | padded s | padding removed s | x padded | "
          "max diff at valid frames | max diff batched vs alone |")
    print("|---" * 9 + "|")
    print(f"| {utterances} | {args.batch_size} | {args.threads} | {100 * padding_share(encoder, batches):.1f} | "
          f"{padded_s:.3f} | {removed_s:.3f} | {padded_s / removed_s:.2f} | "
          f"{valid_frame_difference(encoder, batches, removed, padded):.2e} | "
          f"{batch_invariance(encoder, batches[0], removed[0]):.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
