"""``fairseq-accel-compress``: a trained (or compression-fine-tuned) fairseq checkpoint as a compressed
checkpoint (fairseq_accel/compression/compressed_format.py) that ``fairseq-generate --user-dir user_dir``
decodes directly, in int8, and ``--inspect`` to print what a compressed checkpoint holds.

Every 2-D weight (linear layers, embeddings, output projection) is stored as per-row int8 (or int4)
levels, only the non-zero ones with a 1-bit mask where the weight is sparse enough for that to be smaller;
biases, norms and convolution kernels stay float32; tied and shared tensors are stored once. With
``--data``, calibration batches run through the model first and every int8 linear layer gets the scale of
its input (least squared error by default), which int8 execution needs.
"""
import argparse
import logging
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Pattern, Sequence, Tuple

from tqdm import tqdm

import fairseq_accel.plugin  # noqa: F401  (safe checkpoint loading; the compressed-checkpoint reader)
from fairseq_accel.compat.checkpoint_files import COMPRESSED_KEY, CheckpointLoadError, write_checkpoint
from fairseq_accel.compat.checkpoint_loading import read_checkpoint
from fairseq_accel.compression.activation_calibration import (
    SAMPLED_METHODS,
    LinearInputCalibrator,
    cached_projections,
    calibration_batches,
    linear_layers,
    run_calibration,
)
from fairseq_accel.compression.calibration import THRESHOLDS, CalibrationError
from fairseq_accel.compression.compressed_format import (
    CompressedFormatError,
    SizeRow,
    check_version,
    compress_model_state,
    size_rows,
    storage_aliases,
)
from fairseq_accel.compression.ranking_calibration import (
    RANKING,
    RANKING_WEIGHT,
    SAMPLE_SENTENCES,
    SentenceSample,
    attention_layouts,
)
from fairseq_accel.compression.mixed_precision import format_sensitivity_table, plan_mixed_precision
from fairseq_accel.compression.sensitivity_measures import SENSITIVITY_METRICS, sensitivity_measure
from fairseq_accel.compression.similarity_calibration import SAMPLE_ROWS
from fairseq_accel.decoding_metrics import PostProcessingError
from fairseq_accel.compression import COMPRESSION_KEY

PROG = "fairseq-accel-compress"

EXAMPLES = """examples:
  # int8 weights (sparse ones with a bitmask) and calibrated activations from 50 batches of valid
  fairseq-accel-compress --path exp/lite/checkpoints/checkpoint_last.pt --data data/bin \\
      --calib-batches 50 --out exp/lite/compressed.pt
  # speech: the task's config too; resumable (rerun the same command after an interruption)
  fairseq-accel-compress --path exp/sanm/checkpoint_best.pt --data data/fbank --config-yaml config.yaml \\
      --calib-subset dev --calib-state exp/sanm/calib.pt --out exp/sanm/compressed.pt
  # calibrate on two machines, then merge
  fairseq-accel-compress --path ckpt.pt --data data/bin --calib-shard 0/2 --calib-state part0.pt   # machine A
  fairseq-accel-compress --path ckpt.pt --data data/bin --calib-shard 1/2 --calib-state part1.pt   # machine B
  fairseq-accel-compress --path ckpt.pt --calib-from part0.pt part1.pt --out compressed.pt
  # mixed precision: int8 where it costs at most 0.5 BLEU on 4 batches of valid (beam search per probe),
  # the other layers float32; the per-layer table is printed and saved as exp/lite/compressed.sensitivity.md
  fairseq-accel-compress --path ckpt.pt --data data/bin --max-accuracy-drop 0.5 --sensitivity-metric bleu \
      --sensitivity-batches 4 --remove-bpe sentencepiece --out exp/lite/compressed.pt
  # weights only (no --data): decodes with the weights expanded to float32
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
                    "1-bit masks for sparse weights, float32 for small tensors, and (with --data) the calibrated "
                    "input scale of every int8 linear layer; fairseq-generate --user-dir user_dir decodes it with "
                    "int8 GEMMs (or --compressed-exec float).")
    parser.add_argument("--path", type=Path, help="the fairseq checkpoint to compress")
    parser.add_argument("--out", type=Path, help="the compressed checkpoint to write")
    parser.add_argument("--int4", type=re.compile, metavar="REGEX",
                        help="2-D weights whose name matches REGEX get 4-bit levels (default: none; all int8)")
    parser.add_argument("--keep-float", type=re.compile, metavar="REGEX",
                        help="weights whose name matches REGEX stay float32 (e.g. the most sensitive layers)")
    calibration = parser.add_argument_group(
        "activation calibration", "batches of the task's data run through the model; each linear layer's input "
        "scale comes from the histogram of its inputs")
    calibration.add_argument("--data", help="the task's data folder (fairseq's data-bin, or the speech features "
                                            "folder); without it (and --calib-from) no layer can run in int8")
    calibration.add_argument("--config-yaml", help="speech_to_text tasks: the config file in --data")
    calibration.add_argument("--user-dir", help="a fairseq plugin the checkpoint's model needs (this one is loaded)")
    calibration.add_argument("--calib-subset", default="valid", help="the subset to calibrate on (default valid)")
    calibration.add_argument("--calib-batches", type=int, default=50, help="batches to run (default 50)")
    calibration.add_argument("--max-tokens", type=int, default=4000, help="tokens (frames) per batch (default 4000)")
    calibration.add_argument("--act-calib", choices=sorted([*THRESHOLDS, *SAMPLED_METHODS]), default="mse",
                             help="threshold of each layer's input range: mse (least squared error, default), kl "
                                  "(TensorRT's entropy calibration), percentile (99.99), max, pearson "
                                  "(similarity-aware, arXiv 2106.14156: the range whose quantized input keeps the "
                                  f"layer's outputs most correlated with the float ones, on {SAMPLE_ROWS} sampled "
                                  "input rows per layer), ranking (pearson, and for the inputs of attention query and "
                                  "key projections less --ranking-weight times the share of attention-weight order "
                                  f"quantization reverses, on {SAMPLE_SENTENCES} sampled sentences per attention "
                                  "layer; arXiv 2106.14156 §3.3). Measured on the mini LSRA (valid loss, float 2.041): mse "
                                  "2.042, max 2.041, percentile 2.043, kl 2.081, pearson 2.136; test BLEU of a "
                                  "retrained copy (float 39.88): mse 39.80, pearson 33.43, ranking 34.03 (with 7-bit "
                                  "activations entropy calibration clips too much, and Pearson correlation does "
                                  "not see the shift clipping makes)")
    calibration.add_argument("--ranking-weight", type=float, default=RANKING_WEIGHT, metavar="GAMMA",
                             help=f"--act-calib {RANKING}: weight of the ranking loss against the correlation "
                                  f"(default {RANKING_WEIGHT})")
    calibration.add_argument("--calib-state", type=Path, metavar="FILE",
                             help="save the histograms here as calibration goes, and resume from it if it exists")
    calibration.add_argument("--calib-shard", type=_shard, metavar="K/N", default=(0, 1),
                             help="calibrate only shard K of N of the batches and stop (needs --calib-state)")
    calibration.add_argument("--calib-from", type=Path, nargs="+", metavar="FILE",
                             help="merge these calibration states (of --calib-shard runs) instead of calibrating")
    mixed = parser.add_argument_group(
        "mixed precision by sensitivity", "each calibrated layer alone in int8, the damage to a dev metric measured; "
        "the least sensitive layers run in int8 as long as together they do at most --max-accuracy-drop of damage, "
        "the others keep float32 weights (needs --data)")
    mixed.add_argument("--max-accuracy-drop", type=float, metavar="AMOUNT",
                       help="the most damage the int8 layers may do together, in the units of --sensitivity-metric: "
                            "nats per target token of loss, or BLEU, WER or CER points")
    mixed.add_argument("--sensitivity-metric", choices=SENSITIVITY_METRICS, default="loss",
                       help="loss: the teacher-forced loss (fast; default); bleu, wer, cer: decoded by the real "
                            "generator, beam search, or the CTC head's best path for wer/cer of a model that has one "
                            "(a CTC-decoded speech model needs these: its decoder's loss does not see the CTC branch)")
    mixed.add_argument("--sensitivity-beam", type=int, default=5, help="beam size of bleu/wer/cer decoding (default 5)")
    mixed.add_argument("--remove-bpe", metavar="POST_PROCESS",
                       help="as fairseq-generate's --post-process before bleu/wer/cer scoring, e.g. sentencepiece for "
                            "translation data (speech tasks decode their own BPE)")
    mixed.add_argument("--mixed-int4", action="store_true",
                       help="also give 4-bit weights (inputs stay int8) to the least sensitive int8 layers, as long "
                            "as the damage stays within --max-accuracy-drop; the plan decides every calibrated "
                            "linear layer's bits, --int4 the others'")
    mixed.add_argument("--sensitivity-subset", help="the subset to measure it on (default: --calib-subset)")
    mixed.add_argument("--sensitivity-batches", type=int, default=10, help="batches to measure on (default 10)")
    parser.add_argument("--inspect", type=Path, metavar="COMPRESSED",
                        help="print the bytes of every tensor of a compressed checkpoint and exit")
    parser.add_argument("--top", type=int, default=12, help="largest tensors listed in the size table (default 12)")
    return parser


def _shard(text: str) -> Tuple[int, int]:
    match = re.fullmatch(r"(\d+)/(\d+)", text)
    if match is None or not int(match[1]) < int(match[2]):
        raise argparse.ArgumentTypeError(f"expected K/N with 0 <= K < N, got {text!r}")
    return int(match[1]), int(match[2])


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


def _check_source(source: Path, state: Dict[str, Any]) -> None:
    if COMPRESSED_KEY in state:
        raise CompressedFormatError(f"{source} is already compressed; compress the original checkpoint instead")
    if not isinstance(state.get("model"), dict):
        raise CompressedFormatError(f"{source}: not a fairseq checkpoint (no 'model' state)")


def _load_model_and_task(args: argparse.Namespace) -> Tuple[Any, Any]:
    """The checkpoint's model (eval mode, CPU) and its task, reading its data from ``--data``."""
    from fairseq import checkpoint_utils, utils

    if args.user_dir:
        utils.import_user_module(argparse.Namespace(user_dir=args.user_dir))
    overrides = {"data": args.data}
    if args.config_yaml:
        overrides["config_yaml"] = args.config_yaml
    logging.getLogger("fairseq").setLevel(logging.WARNING)  # its dataset and model INFO lines, not ours
    models, _, task = checkpoint_utils.load_model_ensemble_and_task([str(args.path)], arg_overrides=overrides)
    return models[0].eval(), task


def _calibrated(args: argparse.Namespace) -> Tuple[LinearInputCalibrator, Optional[Tuple[Any, Any]]]:
    """The histograms of every linear layer's input: merged from ``--calib-from``, or run on ``--data``
    (resumed from ``--calib-state`` when it exists), and the (model, task) that ran them (None for
    ``--calib-from``)."""
    if args.calib_from:
        states = [(str(path), read_checkpoint(str(path))) for path in args.calib_from]
        first = states[0][1]
        attentions = {name: SentenceSample.from_state_dict(sample).layout
                      for name, sample in first.get("sentences", {}).items()}
        calibrator = LinearInputCalibrator(first.get("histograms", {}), first.get("output_absmax", {}),
                                           SAMPLE_ROWS if first.get("samples") else 0, attentions)
        for source, state in states:
            calibrator.load_state_dict(state, source)
        return calibrator, None
    model, task = _load_model_and_task(args)
    sample_rows = SAMPLE_ROWS if args.act_calib in SAMPLED_METHODS else 0
    attentions = attention_layouts(model) if args.act_calib == RANKING else {}
    calibrator = LinearInputCalibrator(linear_layers(model), cached_projections(model), sample_rows, attentions)
    meta = {"checkpoint": args.path.name, "subset": args.calib_subset, "max_tokens": args.max_tokens,
            "shard": "/".join(map(str, args.calib_shard)), "sampled_rows": sample_rows,
            "sampled_sentences": SAMPLE_SENTENCES if attentions else 0}
    if args.calib_state is not None and args.calib_state.exists():
        saved = read_checkpoint(str(args.calib_state))
        if saved.get("meta") != meta:
            raise CalibrationError(f"{args.calib_state} holds the calibration of {saved.get('meta')}, not of {meta}; "
                                   "give another --calib-state or delete it")
        calibrator.load_state_dict(saved, str(args.calib_state))
        print(f"resuming the calibration in {args.calib_state} after {calibrator.batches} batches", file=sys.stderr)
    save = None if args.calib_state is None else (lambda: calibrator.save(args.calib_state, meta))
    batches = calibration_batches(task, model, args.calib_subset, args.calib_batches, args.max_tokens,
                                  args.calib_shard)
    with tqdm(total=args.calib_batches, desc="calibrate", unit="batch", file=sys.stderr, mininterval=1) as progress:
        run_calibration(model, calibrator, batches, save=save, progress=progress)
    calibrator.require_batches()
    return calibrator, (model, task)


def _stored_names(calibrator: LinearInputCalibrator, model_state: Dict[str, Any], bits_of: Any) -> Dict[str, str]:
    """The stored weight name of every calibrated linear layer whose weight is stored as integer levels."""
    aliases = storage_aliases(model_state)
    stored_name = {layer: aliases.get(f"{layer}.weight", f"{layer}.weight") for layer in calibrator.histograms}
    return {layer: name for layer, name in stored_name.items()
            if name in model_state and bits_of(name, model_state[name]) is not None}


def _quantizers(calibrator: LinearInputCalibrator, args: argparse.Namespace, stored_name: Dict[str, str],
                model_state: Dict[str, Any]) -> Dict[str, Tuple[float, int]]:
    """The input quantizer of each layer in ``stored_name`` by ``--act-calib`` (similarity- and ranking-aware
    calibration read the float weights of every calibrated layer in the checkpoint)."""
    aliases = storage_aliases(model_state)
    weight_names = {layer: aliases.get(f"{layer}.weight", f"{layer}.weight") for layer in calibrator.histograms}
    weights = {layer: (model_state[name], model_state.get(f"{layer}.bias"))
               for layer, name in weight_names.items() if name in model_state}
    return calibrator.quantizers(args.act_calib, stored_name, weights, args.ranking_weight)


def _activation_record(calibrator: LinearInputCalibrator, model_state: Dict[str, Any], bits_of: Any,
                       args: argparse.Namespace) -> Dict[str, Any]:
    """The calibration record of the compressed section: the input scale of every linear layer whose weight
    is stored as integer levels, by that weight's stored name."""
    stored_name = _stored_names(calibrator, model_state, bits_of)
    quantizers = _quantizers(calibrator, args, stored_name, model_state)
    return {"method": args.act_calib, "batches": calibrator.batches, "subset": args.calib_subset,
            "scales": {stored_name[layer]: scale for layer, (scale, _) in quantizers.items()},
            "zero_points": {stored_name[layer]: zero for layer, (_, zero) in quantizers.items()},
            "output_absmax": {stored_name[layer]: absmax.half() for layer, absmax in calibrator.output_absmax.items()
                              if layer in stored_name and absmax is not None}}


def _mixed_precision(args: argparse.Namespace, calibrator: LinearInputCalibrator, model: Any, task: Any,
                     model_state: Dict[str, Any], bits_of: Any) -> Dict[str, Optional[int]]:
    """The weight bits (4, 8, or None: float32) that sensitivity chose, by stored weight name; prints and saves
    the per-layer table."""
    stored_name = _stored_names(calibrator, model_state, bits_of)
    quantizers = {layer: (8 if args.mixed_int4 else bits_of(stored_name[layer], model_state[stored_name[layer]]),
                          *quantizer)
                  for layer, quantizer in _quantizers(calibrator, args, stored_name, model_state).items()}
    subset = args.sensitivity_subset or args.calib_subset
    batches = list(calibration_batches(task, model, subset, args.sensitivity_batches, args.max_tokens))
    probes = len(quantizers) * (2 if args.mixed_int4 else 1)  # each layer alone in int8 (and with int4 weights)
    measure = sensitivity_measure(args.sensitivity_metric, model, task, batches, args.sensitivity_beam, args.remove_bpe)
    with tqdm(total=probes, desc="sensitivity", unit="probe", file=sys.stderr, mininterval=1) as progress:
        base, rows = plan_mixed_precision(model, quantizers, measure, args.max_accuracy_drop, progress.update,
                                          allow_int4=args.mixed_int4)
    table = format_sensitivity_table(measure, base, rows)
    print(table)
    args.out.with_suffix(".sensitivity.md").write_text(table + "\n")
    fixed_bits = {"int4": 4, "float32": None}  # int8 layers keep their grid of --int4 (or 8 with --mixed-int4)
    return {stored_name[row.name]: fixed_bits.get(row.precision, quantizers[row.name][0]) for row in rows}


def _compressed_state(state: Dict[str, Any], calibrator: Optional[LinearInputCalibrator],
                      args: argparse.Namespace, loaded: Optional[Tuple[Any, Any]] = None) -> Dict[str, Any]:
    compressed = {key: value for key, value in state.items() if key not in ("model", "last_optimizer_state")}
    task_state = dict(state.get("task_state") or {})
    task_state.pop(COMPRESSION_KEY, None)  # masks and importance sums: the zeros of the weights say it all
    compressed["task_state"] = task_state
    bits_of = _bits_chooser(args.int4, args.keep_float)
    if args.max_accuracy_drop is not None:
        planned = _mixed_precision(args, calibrator, *loaded, state["model"], bits_of)
        chosen = bits_of
        bits_of = lambda name, tensor: planned[name] if name in planned else chosen(name, tensor)  # noqa: E731
    activations = None if calibrator is None else _activation_record(calibrator, state["model"], bits_of, args)
    compressed[COMPRESSED_KEY] = compress_model_state(state["model"], bits_of, activations)
    return compressed


def _check_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.inspect is not None:
        return
    sharded = args.calib_shard != (0, 1)
    if args.path is None or (args.out is None and not sharded):
        parser.error("give --path and --out to compress, or --inspect COMPRESSED")
    if args.calib_from and args.data:
        parser.error("give --data (calibrate) or --calib-from (merge calibrations), not both")
    if sharded and (args.calib_state is None or args.data is None):
        parser.error("--calib-shard calibrates one part of --data into --calib-state; give both")
    if min(args.calib_batches, args.sensitivity_batches, args.sensitivity_beam) < 1:
        parser.error("--calib-batches, --sensitivity-batches and --sensitivity-beam must be at least 1")
    if args.max_accuracy_drop is not None and (args.max_accuracy_drop < 0 or not args.data):
        parser.error(f"--max-accuracy-drop needs --data and a value >= 0 ({args.sensitivity_metric} damage), got "
                     f"{args.max_accuracy_drop}{'' if args.data else ' without --data'}")
    if args.mixed_int4 and args.max_accuracy_drop is None:
        parser.error("--mixed-int4 lets --max-accuracy-drop choose int4 layers; give --max-accuracy-drop too")


def _inspect(path: Path, top: int) -> None:
    state = read_checkpoint(str(path))
    if COMPRESSED_KEY not in state:
        raise CompressedFormatError(f"{path} is not a compressed checkpoint (no {COMPRESSED_KEY} section); make "
                                    f"one with {PROG} --path CKPT --out COMPRESSED")
    check_version(state[COMPRESSED_KEY], str(path))
    print(format_size_table(size_rows(state[COMPRESSED_KEY]), top))


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); a checkpoint that cannot be compressed or
    read, or calibration data that cannot be used, is one ``fairseq-accel-compress: error:`` line and exit
    status 2."""
    parser = _parser()
    args = parser.parse_args(argv)
    _check_options(parser, args)
    warnings.filterwarnings("ignore", message=".*pin_memory.*")  # fairseq's batch loader on a machine without GPU
    try:
        if args.inspect is not None:
            _inspect(args.inspect, args.top)
            return 0
        state = read_checkpoint(str(args.path))
        _check_source(args.path, state)
        calibrator, loaded = _calibrated(args) if args.data or args.calib_from else (None, None)
        if args.out is None:
            print(f"calibrated shard {args.calib_shard[0]}/{args.calib_shard[1]}: {calibrator.batches} batches in "
                  f"{args.calib_state}; merge the shards with --calib-from")
            return 0
        compressed = _compressed_state(state, calibrator, args, loaded)
        write_checkpoint(compressed, args.out)
    except (CompressedFormatError, CheckpointLoadError, CalibrationError, PostProcessingError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    print(format_size_table(size_rows(compressed[COMPRESSED_KEY]), args.top))
    activations = compressed[COMPRESSED_KEY].get("activations")
    if activations is not None:
        print(f"activations: {len(activations['scales'])} linear layers calibrated ({activations['method']}, "
              f"{activations['batches']} batches of {activations['subset']}): they run as int8 GEMMs")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
