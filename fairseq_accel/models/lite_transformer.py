"""Lite Transformer: a fairseq transformer whose self-attention is long-short range attention (LSRA).

Wu, Liu, Lin, Lin, Han. "Lite Transformer with Long-Short Range Attention", ICLR 2020 (arXiv:2004.11886).
Each layer's self-attention is replaced by ``MultiBranch`` (attention beside a lightweight or dynamic
convolution, channels split between them) and the FFN is "flattened" (hidden size = embedding size).
Everything else — embeddings, positions, cross-attention, output projection, incremental decoding — is
fairseq's transformer, reused through its ``build_encoder``/``build_decoder``/``build_*_layer`` hooks.
"""
import argparse
from typing import Iterator, List, Optional

from fairseq import options
from fairseq.distributed import fsdp_wrap
from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer import (
    TransformerDecoderBase,
    TransformerEncoderBase,
    TransformerModel,
    base_architecture as transformer_base_architecture,
)
from fairseq.modules.transformer_layer import TransformerDecoderLayerBase, TransformerEncoderLayerBase
from fairseq.modules.checkpoint_activations import checkpoint_wrapper
from torch import nn

from fairseq_accel.modules.branch_spec import (
    BranchSpec,
    convolution_branches,
    default_kernel_sizes,
    even_split,
    resolve_layer_branches,
)
from fairseq_accel.models.option_checks import fill_default, format_value
from fairseq_accel.modules.layer_sharing import SharedLayersModel, add_layer_sharing_args
from fairseq_accel.modules.multibranch import MultiBranch


def _wrap_layer(layer: nn.Module, cfg) -> nn.Module:
    """Activation checkpointing and FSDP wrapping, as fairseq's own layer builders do."""
    if cfg.checkpoint_activations:
        layer = checkpoint_wrapper(layer, offload_to_cpu=cfg.offload_activations)
    return fsdp_wrap(layer, min_num_params=0 if cfg.checkpoint_activations else cfg.min_params_to_wrap)


def _build_multibranch(cfg, branches: List[BranchSpec], side: str, causal: bool) -> MultiBranch:
    return MultiBranch(
        branches,
        causal=causal,
        attention_dropout=cfg.attention_dropout,
        glu=bool(getattr(cfg, f"{side}_glu")),
        weight_softmax=bool(cfg.weight_softmax),
        weight_dropout=cfg.weight_dropout,
    )


class LiteTransformerEncoderLayer(TransformerEncoderLayerBase):
    """fairseq's encoder layer with LSRA as self-attention (non-causal convolutions)."""

    def __init__(self, cfg, branches: List[BranchSpec]):
        # The base constructor calls build_self_attention(), which needs this layer's branches.
        self.lsra_branches = branches
        super().__init__(cfg)

    def build_self_attention(self, embed_dim: int, cfg) -> MultiBranch:
        return _build_multibranch(cfg, self.lsra_branches, "encoder", causal=False)


class LiteTransformerDecoderLayer(TransformerDecoderLayerBase):
    """fairseq's decoder layer with LSRA as self-attention (causal convolutions) and full cross-attention."""

    def __init__(self, cfg, branches: List[BranchSpec], no_encoder_attn: bool = False):
        self.lsra_branches = branches
        super().__init__(cfg, no_encoder_attn)

    def build_self_attention(self, embed_dim: int, cfg, add_bias_kv=False, add_zero_attn=False) -> MultiBranch:
        return _build_multibranch(cfg, self.lsra_branches, "decoder", causal=True)


class LiteTransformerEncoder(TransformerEncoderBase):
    def __init__(self, cfg, dictionary, embed_tokens):
        # fairseq builds the layers inside its constructor via build_encoder_layer(cfg), without an
        # index; the per-layer kernel sizes are resolved (and validated) first and consumed in order.
        self._pending_layers: Iterator[List[BranchSpec]] = iter(
            resolve_layer_branches(
                cfg.encoder_branch_type, cfg.encoder_kernel_size_list, cfg.encoder.layers,
                cfg.encoder.embed_dim, "encoder",
            )
        )
        super().__init__(cfg, dictionary, embed_tokens)
        del self._pending_layers

    def build_encoder_layer(self, cfg) -> nn.Module:
        return _wrap_layer(LiteTransformerEncoderLayer(cfg, next(self._pending_layers)), cfg)


class LiteTransformerDecoder(TransformerDecoderBase):
    def __init__(self, cfg, dictionary, embed_tokens, no_encoder_attn=False, output_projection=None):
        self._pending_layers: Iterator[List[BranchSpec]] = iter(
            resolve_layer_branches(
                cfg.decoder_branch_type, cfg.decoder_kernel_size_list, cfg.decoder.layers,
                cfg.decoder.embed_dim, "decoder",
            )
        )
        super().__init__(cfg, dictionary, embed_tokens, no_encoder_attn, output_projection)
        del self._pending_layers

    def build_decoder_layer(self, cfg, no_encoder_attn=False) -> nn.Module:
        return _wrap_layer(LiteTransformerDecoderLayer(cfg, next(self._pending_layers), no_encoder_attn), cfg)


def add_lsra_args(parser: argparse.ArgumentParser, sides=("encoder", "decoder")) -> None:
    """The LSRA options of the given sides (``encoder``, ``decoder``) plus the shared kernel options."""
    # fmt: off
    for side in sides:
        parser.add_argument(f"--{side}-branch-type", nargs="+", metavar="TYPE:KERNEL:DIM:HEADS",
                            help=f"{side} LSRA branches, e.g. attn:1:80:4 lightweight:default:80:4; TYPE is attn, "
                                 f"lightweight or dynamic, KERNEL 'default' takes the layer's entry of "
                                 f"--{side}-kernel-size-list, DIMs must sum to --{side}-embed-dim"
                                 + ("; decoder convolutions are causal" if side == "decoder" else ""))
        parser.add_argument(f"--{side}-kernel-size-list", nargs="+", type=int, metavar="K",
                            help=f"convolution kernel size of each {side} layer (paper: 3 7 15 31 31 31)")
        parser.add_argument(f"--{side}-glu", type=options.eval_bool, metavar="BOOL",
                            help=f"GLU after the input projection of {side} convolution branches")
    parser.add_argument("--weight-softmax", type=options.eval_bool, metavar="BOOL",
                        help="normalise convolution kernels with a softmax over their taps")
    parser.add_argument("--weight-dropout", type=float, metavar="D",
                        help="DropConnect probability on convolution kernels")
    # fmt: on


def kernel_size_hint(side: str) -> str:
    """What makes LSRA layers' convolution kernels equal, for a cross-layer sharing error."""
    return f"layers that share weights need equal --{side}-kernel-size-list entries (their convolution kernels)"


@register_model("lite_transformer")
class LiteTransformerModel(SharedLayersModel, TransformerModel):
    """Lite Transformer (LSRA) encoder-decoder; takes every ``transformer`` option plus the LSRA ones and
    cross-layer weight sharing."""

    @staticmethod
    def add_args(parser: argparse.ArgumentParser) -> None:
        TransformerModel.add_args(parser)
        add_lsra_args(parser, sides=("encoder", "decoder"))
        add_layer_sharing_args(parser)

    @classmethod
    def sharing_hints(cls, args):
        return {side: kernel_size_hint(side) for side in ("encoder", "decoder")}

    @classmethod
    def build_encoder(cls, cfg, src_dict, embed_tokens) -> LiteTransformerEncoder:
        return LiteTransformerEncoder(cfg, src_dict, embed_tokens)

    @classmethod
    def build_decoder(cls, cfg, tgt_dict, embed_tokens) -> LiteTransformerDecoder:
        return LiteTransformerDecoder(cfg, tgt_dict, embed_tokens, no_encoder_attn=cfg.no_cross_attention)


def lsra_defaults(
    args, conv_type: str, glu: bool, sides=("encoder", "decoder"), branch_heads: int = 4,
    weight_dropout: Optional[float] = None,
) -> None:
    """Fill the LSRA options of ``sides`` from the (already set) sizes; ``weight_dropout`` defaults to
    ``--attention-dropout``.

    Every paper config gives each branch 4 heads (``attn:1:d/2:4``), whatever the cross-attention uses.
    A convolution option that the branches leave nothing to act on is refused unless it has its default.
    """
    with_convolution = []
    for side in sides:
        fill_default(args, f"{side}_branch_type", even_split(getattr(args, f"{side}_embed_dim"), conv_type, branch_heads))
        branch_type = getattr(args, f"{side}_branch_type")
        convolutions = convolution_branches(branch_type, f"--{side}-branch-type")
        given = f"--{side}-branch-type {format_value(branch_type)}"
        if convolutions:
            with_convolution.append(side)
        fill_default(args, f"{side}_glu", glu, None if convolutions else f"applies to convolution branches; {given} has none")
        fill_default(
            args, f"{side}_kernel_size_list", default_kernel_sizes(getattr(args, f"{side}_layers")),
            None if any(branch.kernel_size is None for branch in convolutions)
            else f"applies to convolution branches of kernel 'default'; {given} has none",
        )
    shared = None if with_convolution else (
        "applies to convolution branches; " + " and ".join(f"--{side}-branch-type" for side in sides)
        + (" has none" if len(sides) == 1 else " have none")
    )
    fill_default(args, "weight_softmax", True, shared)
    fill_default(args, "weight_dropout", args.attention_dropout if weight_dropout is None else weight_dropout, shared)


def _lsra_defaults(args, conv_type: str, glu: bool, weight_dropout: Optional[float] = None) -> None:
    """Stock transformer defaults, then the LSRA options of both sides."""
    transformer_base_architecture(args)
    lsra_defaults(args, conv_type, glu, weight_dropout=weight_dropout)


def _sizes(args, embed_dim: int, heads: int, layers: int = 6) -> None:
    """Flattened FFN (hidden = embedding size), as in the paper's configs. The encoder has no layer that
    ``--encoder-attention-heads`` could set (its attention heads come from ``--encoder-branch-type``);
    the decoder's sets its cross-attention."""
    fill_default(args, "encoder_attention_heads", heads,
                 "has no effect: the LSRA encoder's attention heads are given by --encoder-branch-type")
    fill_default(args, "decoder_attention_heads", heads)
    for side in ("encoder", "decoder"):
        setattr(args, f"{side}_embed_dim", getattr(args, f"{side}_embed_dim", embed_dim))
        dim = getattr(args, f"{side}_embed_dim")
        setattr(args, f"{side}_ffn_embed_dim", getattr(args, f"{side}_ffn_embed_dim", dim))
        setattr(args, f"{side}_layers", getattr(args, f"{side}_layers", layers))


@register_model_architecture("lite_transformer", "lite_transformer")
def lite_transformer_base(args) -> None:
    """Paper base: WMT-size model with dynamic convolutions and GLU."""
    _sizes(args, embed_dim=496, heads=8)
    _lsra_defaults(args, conv_type="dynamic", glu=True)


@register_model_architecture("lite_transformer", "lite_transformer_iwslt_de_en")
def lite_transformer_iwslt_de_en(args) -> None:
    """IWSLT'14 De-En (configs/iwslt14.de-en/.../embed160.yml): d 160, lightweight conv, no GLU."""
    _sizes(args, embed_dim=160, heads=4)
    args.dropout = getattr(args, "dropout", 0.2)
    _lsra_defaults(args, conv_type="lightweight", glu=False, weight_dropout=0.1)


@register_model_architecture("lite_transformer", "lite_transformer_wmt_en_de")
def lite_transformer_wmt_en_de(args) -> None:
    """WMT En-De (configs/wmt16.en-de/.../embed496.yml): d 496, dynamic conv, GLU, shared embeddings."""
    _sizes(args, embed_dim=496, heads=8)
    args.share_all_embeddings = getattr(args, "share_all_embeddings", True)
    args.attention_dropout = getattr(args, "attention_dropout", 0.08)
    _lsra_defaults(args, conv_type="dynamic", glu=True, weight_dropout=0.08)


@register_model_architecture("lite_transformer", "lite_transformer_wmt_en_fr")
def lite_transformer_wmt_en_fr(args) -> None:
    """WMT'14 En-Fr (configs/wmt14.en-fr/.../embed496.yml): same layout as En-De."""
    lite_transformer_wmt_en_de(args)


@register_model_architecture("lite_transformer", "lite_transformer_mini")
def lite_transformer_mini(args) -> None:
    """CPU-sized model for the offline mini recipes: d 256, 3+3 layers, lightweight conv."""
    _sizes(args, embed_dim=256, heads=4, layers=3)
    args.dropout = getattr(args, "dropout", 0.1)
    _lsra_defaults(args, conv_type="lightweight", glu=False)
