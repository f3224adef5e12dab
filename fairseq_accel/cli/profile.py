"""``fairseq-accel-profile``: parameters and Mult-Adds of a fairseq translation model next to a Transformer.

The model is given as ``--arch NAME`` plus that arch's own options (parsed like ``fairseq-train`` parses
them), or as a trained checkpoint (``--path``). The counting convention is in ``fairseq_accel.profiling``.
"""
import argparse
import json
import shlex
import sys
import textwrap
from typing import Any, Callable, Dict, List, Optional, Tuple

import fairseq_accel.plugin  # noqa: F401  (registers the plugin's architectures)
from fairseq_accel.profiling import (
    SENTENCE_LENGTH,
    ModelProfile,
    ProfileError,
    build_model,
    load_checkpoint_model,
    match_width,
    model_class,
    profile_arch,
    profile_model,
    resolve_arch_args,
    size_options,
    source_features,
)

PROG = "fairseq-accel-profile"
DEFAULT_VOCAB_SIZE = 32000
DEFAULT_BASELINES = {"text": "transformer", "speech": "s2t_transformer"}
BASELINE_FFN_RATIO = 4  # Transformer-base: FFN = 4 x embedding dimension
# Copied from the model to the default baseline (when both have them), so that totals compare like for like.
SHARING_OPTIONS = ("share_all_embeddings", "share_decoder_input_output_embed")

COUNTING_NOTE = (
    "Mult-Adds: multiply-accumulates of every matrix product in a teacher-forced forward pass of one "
    "sentence of {src_len} source and {tgt_len} target tokens (batch 1) through encoder and decoder: linear "
    "layers, attention QK^T and AV products (full matrices), convolution taps and dynamic-kernel prediction. "
    "Excluded: the output projection to the vocabulary (shown on its own line) and embedding lookups; "
    "element-wise work (normalisation, softmax, activations) is not counted. "
    "Parameters without embeddings exclude token embeddings, learned positional embeddings and the output "
    "projection when it is a separate (untied) vocabulary-size matrix; shared matrices (tied embeddings, "
    "layers that share weights) are counted once, while Mult-Adds count every layer run. "
    "Speech models (s2t_*): the source is {src_len} frames of 80 filterbank features, front-end included."
)


def _wrapped_note(src_len: Any, tgt_len: Any, indent: str = "") -> str:
    """``COUNTING_NOTE`` for these sentence lengths, wrapped at 100 columns."""
    note = COUNTING_NOTE.format(src_len=src_len, tgt_len=tgt_len)
    return textwrap.fill(note, width=100, initial_indent=indent, subsequent_indent=indent)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults (but not empty ones or off switches) and keep the hand-made line breaks of the examples."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default == "":
            return action.help
        return super()._get_help_string(action)


def build_parser(arch: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser of ``fairseq-accel-profile``; with ``arch``, also that arch's model options."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=_HelpFormatter,
        usage="%(prog)s (--arch ARCH [MODEL OPTIONS] | --path CHECKPOINT) [options]",
        description="Count the parameters and Mult-Adds of a fairseq encoder-decoder translation model\n"
        "(any registered arch: lite_transformer_*, transformer*, lightconv*, ...) the way the Lite\n"
        "Transformer paper (arXiv:2004.11886) reports them, next to a stock Transformer of the same\n"
        "width (or, with --match-mult-adds, of the same Mult-Adds).",
        epilog=f"""examples:
  # Lite Transformer, WMT En-Fr layout at d=200 (paper: 2.8M parameters, 90M Mult-Adds)
  {PROG} --arch lite_transformer_wmt_en_fr --encoder-embed-dim 200 --decoder-embed-dim 200
  # ... and the Transformer with the closest Mult-Adds (how the recipes choose a matched baseline)
  {PROG} --arch lite_transformer_wmt_en_fr --encoder-embed-dim 200 --decoder-embed-dim 200 --match-mult-adds
  # a stock fairseq arch alone, as JSON
  {PROG} --arch transformer_iwslt_de_en --no-baseline --format json
  # a baseline of your own sizes (FFN = 4 x its embedding dim unless given)
  {PROG} --arch lite_transformer_mini --baseline-args '--encoder-embed-dim 192 --decoder-embed-dim 192'
  # a trained checkpoint (vocabulary sizes are read from it)
  {PROG} --path checkpoints/checkpoint_best.pt
  # the model options an arch accepts
  {PROG} --arch lite_transformer_iwslt_de_en --help

what is counted:
{_wrapped_note("--src-len", "--tgt-len", indent="  ")}""",
    )
    source = parser.add_argument_group("model to profile (one of)")
    source.add_argument("--arch", "-a", metavar="ARCH",
                        help="registered architecture, e.g. lite_transformer_wmt_en_fr; its options (as for "
                             "fairseq-train, e.g. --encoder-embed-dim 200) may follow")
    source.add_argument("--path", metavar="CHECKPOINT", help="a fairseq checkpoint (.pt) to profile")
    counting = parser.add_argument_group("counting")
    counting.add_argument("--vocab-size", type=int, metavar="N",
                          help=f"joined vocabulary size for total parameters and the output projection "
                               f"(default {DEFAULT_VOCAB_SIZE}; with --path the checkpoint's sizes)")
    counting.add_argument("--src-len", type=int, default=SENTENCE_LENGTH, metavar="N",
                          help="source sentence length for Mult-Adds (the paper uses 30): tokens, or feature "
                               "frames for a speech model")
    counting.add_argument("--tgt-len", type=int, default=SENTENCE_LENGTH, metavar="N",
                          help="target sentence length for Mult-Adds")
    baseline = parser.add_argument_group("baseline shown beside the model")
    baseline.add_argument("--baseline", metavar="ARCH",
                          help="baseline architecture (default: transformer, or s2t_transformer for a speech "
                               "model); unless --baseline-args says otherwise it gets the model's "
                               "embedding dims, layers, heads and embedding sharing (over the arch's own defaults), "
                               f"and FFN = {BASELINE_FFN_RATIO} x its embedding dim")
    baseline.add_argument("--baseline-args", default="", metavar="'OPTIONS'",
                          help="options of the baseline arch, quoted, e.g. '--encoder-layers 3 --decoder-layers 3'")
    baseline.add_argument("--match-mult-adds", action="store_true",
                          help="choose the baseline's embedding dim (encoder = decoder, a multiple of 8 and of the "
                               "head counts; FFN keeps its ratio) whose Mult-Adds are closest to the model's")
    baseline.add_argument("--no-baseline", action="store_true", help="profile the model alone")
    parser.add_argument("--format", choices=("table", "json"), default="table",
                        help="output: a table, or JSON for scripts (counts as plain integers)")
    if arch is not None:
        options = parser.add_argument_group(
            f"options of --arch {arch} (as in fairseq-train; unset ones take the arch defaults)",
            argument_default=argparse.SUPPRESS,
        )
        _checked_arch("--arch", arch).add_args(options)
    return parser


def _checked_arch(option: str, arch: str) -> type:
    """The model class of ``arch``; errors name the option that gave it."""
    try:
        return model_class(arch)
    except ProfileError as err:
        raise ProfileError(f"{option}: {err}") from err


def _parse(argv: List[str]) -> Tuple[argparse.Namespace, Dict[str, Any]]:
    """Parse ``argv``; return our options and the model options given for ``--arch``."""
    peek = argparse.ArgumentParser(prog=PROG, add_help=False)
    peek.add_argument("--arch", "-a")
    arch = peek.parse_known_args(argv)[0].arch
    main_options = set(vars(build_parser().parse_args([])))
    parser = build_parser(arch)
    args = parser.parse_args(argv)
    if (args.arch is None) == (args.path is None):
        parser.error("give exactly one of --arch and --path")
    if args.path is not None and args.vocab_size is not None:
        parser.error("--vocab-size cannot be used with --path: the checkpoint fixes the vocabulary")
    if args.no_baseline and args.match_mult_adds:
        parser.error("--match-mult-adds needs a baseline; drop --no-baseline")
    if min(args.src_len, args.tgt_len) < 1:
        parser.error("--src-len and --tgt-len must be at least 1")
    if not args.no_baseline and args.baseline is not None:
        _checked_arch("--baseline", args.baseline)  # fail before any model is built
    model_options = {name: value for name, value in vars(args).items() if name not in main_options}
    return args, model_options


def _baseline_arch(args: argparse.Namespace, model_cfg: Any) -> str:
    """``--baseline``, or the default baseline of the model's kind (text or speech)."""
    if args.baseline is not None:
        return args.baseline
    return DEFAULT_BASELINES["speech" if source_features(model_cfg) is not None else "text"]


def _baseline_options(args: argparse.Namespace, baseline_arch: str, model_cfg: Any) -> Dict[str, Any]:
    """The baseline's options: the model's sizes and sharing, FFN = 4 x d, then ``--baseline-args``."""
    accepted = vars(resolve_arch_args(baseline_arch, {}))
    options = {
        name: value
        for name, value in size_options(model_cfg).items()
        if name in accepted and not name.endswith("_ffn_embed_dim")
    }
    options.update(
        {name: getattr(model_cfg, name) for name in SHARING_OPTIONS if name in accepted and hasattr(model_cfg, name)}
    )
    parser = argparse.ArgumentParser(
        prog=f"{PROG} --baseline-args", usage=f"--baseline {baseline_arch} --baseline-args 'OPTIONS'",
        argument_default=argparse.SUPPRESS,
    )
    model_class(baseline_arch).add_args(parser)
    given = vars(parser.parse_args(shlex.split(args.baseline_args)))
    options.update(given)
    for side in ("encoder", "decoder"):
        ffn = f"{side}_ffn_embed_dim"
        if ffn not in given and ffn in accepted and f"{side}_embed_dim" in options:
            options[ffn] = BASELINE_FFN_RATIO * options[f"{side}_embed_dim"]
    return options


def _profiles(args: argparse.Namespace, model_options: Dict[str, Any]) -> List[Tuple[str, ModelProfile]]:
    """(role, profile) of the model and, unless ``--no-baseline``, of its baseline."""
    if args.path is not None:
        model, model_cfg = load_checkpoint_model(args.path)
    else:
        model_cfg = resolve_arch_args(args.arch, model_options)
        vocab_size = DEFAULT_VOCAB_SIZE if args.vocab_size is None else args.vocab_size
        model = build_model(model_cfg, vocab_size, vocab_size)
    profile = profile_model(model, model_cfg, args.src_len, args.tgt_len)
    profiles = [("model", profile)]
    if not args.no_baseline:
        baseline_arch = _baseline_arch(args, model_cfg)
        baseline_options = _baseline_options(args, baseline_arch, model_cfg)
        if args.match_mult_adds:
            baseline_options = match_width(
                baseline_arch, baseline_options, profile.mult_adds.total, args.src_len, args.tgt_len
            )
        baseline = profile_arch(
            baseline_arch, baseline_options, profile.src_vocab_size, args.src_len, args.tgt_len,
            tgt_vocab_size=profile.tgt_vocab_size,
        )
        profiles.append(("baseline", baseline))
    return profiles


def _millions(count: int) -> str:
    """Millions with two decimals (the paper's unit); small counts in thousands or as they are."""
    if count >= 1e6:
        return f"{count / 1e6:.2f}M"
    if count >= 1e3:
        return f"{count / 1e3:.2f}K"
    return str(count)


def _pair(sizes: Dict[str, int], what: str) -> str:
    """``encoder/decoder`` value of a size option, ``-`` where the model has none."""
    return "/".join(str(sizes.get(f"{side}_{what}", "-")) for side in ("encoder", "decoder"))


def format_table(profiles: List[Tuple[str, ModelProfile]], src_len: int, tgt_len: int) -> str:
    """The profiles side by side, with the counting convention as footer."""
    rows: List[Tuple[str, List[str]]] = [
        ("", [profile.arch for _, profile in profiles]),
        ("", [f"({role})" for role, _ in profiles]),
    ]

    def row(label: str, value: Callable[[ModelProfile], str]) -> None:
        rows.append((label, [value(profile) for _, profile in profiles]))

    row("embed dim, encoder/decoder", lambda p: _pair(p.sizes, "embed_dim"))
    row("FFN dim, encoder/decoder", lambda p: _pair(p.sizes, "ffn_embed_dim"))
    row("layers, encoder/decoder", lambda p: _pair(p.sizes, "layers"))
    row("attention heads, enc/dec", lambda p: _pair(p.sizes, "attention_heads"))
    row("vocabulary, source/target", lambda p: f"{p.src_vocab_size or '-'}/{p.tgt_vocab_size}")
    row("parameters w/o embeddings", lambda p: _millions(p.parameters.non_embedding))
    row("  + token embeddings", lambda p: _millions(p.parameters.token_embeddings))
    row("  + positional embeddings", lambda p: _millions(p.parameters.positional_embeddings))
    row("  + output projection", lambda p: _millions(p.parameters.output_projection))
    row("parameters total", lambda p: _millions(p.parameters.total))
    row("Mult-Adds encoder", lambda p: _millions(p.mult_adds.encoder))
    row("Mult-Adds decoder", lambda p: _millions(p.mult_adds.decoder))
    row(f"Mult-Adds total ({src_len}->{tgt_len} tokens)", lambda p: _millions(p.mult_adds.total))
    row("output projection Mult-Adds (excluded)", lambda p: _millions(p.mult_adds.output_projection))
    label_width = max(len(label) for label, _ in rows)
    column_widths = [max(len(values[i]) for _, values in rows) for i in range(len(profiles))]
    lines = [
        "  ".join([label.ljust(label_width)] + [v.ljust(w) for v, w in zip(values, column_widths)]).rstrip()
        for label, values in rows
    ]
    return "\n".join(lines) + "\n\n" + _wrapped_note(src_len, tgt_len)


def format_json(profiles: List[Tuple[str, ModelProfile]], args: argparse.Namespace) -> str:
    """``{"model": ..., "baseline": ... or null, "counting": ...}`` with integer counts."""
    result: Dict[str, Any] = {role: profile.to_dict() for role, profile in profiles}
    result.setdefault("baseline", None)
    if args.path is not None:
        result["model"]["path"] = args.path
    result["counting"] = COUNTING_NOTE.format(src_len=args.src_len, tgt_len=args.tgt_len)
    return json.dumps(result, indent=2)


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); return the exit status.

    An unknown arch, a missing checkpoint, a malformed model option or a model that cannot be profiled
    is reported as one ``fairseq-accel-profile: error:`` line with exit status 2, like argparse's errors.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args, model_options = _parse(argv)
        profiles = _profiles(args, model_options)
    except ValueError as err:  # ProfileError, or a malformed model option (e.g. an LSRA branch spec)
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    if args.format == "json":
        print(format_json(profiles, args))
    else:
        print(format_table(profiles, args.src_len, args.tgt_len))
    return 0


if __name__ == "__main__":
    sys.exit(main())
