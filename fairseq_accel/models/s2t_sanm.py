"""SAN-M speech recognition for fairseq's ``speech_to_text`` task (FunASR's SAN-M, arXiv:2006.01713).

``s2t_sanm`` is fairseq's ``s2t_transformer`` with
* a SAN-M encoder: a masked conv2d (4x) or LFR front-end, then pre-norm layers whose self-attention
  carries an FSMN memory block; a first layer may change the width and then has no residual (FunASR
  ``SANMEncoder``: LFR features of 7x80 dims go straight into the first layer);
* an FSMN decoder (FunASR ``FsmnDecoder``): no self-attention, each layer is FFN -> causal FSMN memory
  -> cross-attention, then one FFN-only layer — or fairseq's transformer decoder (``--decoder-type``).
Everything else (task, data, generation) is stock fairseq.
"""
import argparse
import math
from typing import Dict, List, Optional

import torch
from fairseq.models import FairseqEncoder, FairseqIncrementalDecoder, register_model, register_model_architecture
from fairseq.models.speech_to_text.s2t_transformer import S2TTransformerModel
from fairseq.models.speech_to_text.s2t_transformer import base_architecture as s2t_base_architecture
from torch import Tensor, nn

from fairseq_accel.models.ctc_head import build_ctc_head
from fairseq_accel.modules.sanm_attention import (
    CausalFSMN,
    DecoderFeedForward,
    IncrementalState,
    MultiHeadedAttentionSANM,
    MultiHeadedCrossAttention,
    PositionwiseFeedForward,
)
from fairseq_accel.modules.speech_frontend import Conv2dSubsampling, LowFrameRate, padding_mask, sinusoidal_positions

EncoderOut = Dict[str, List[Tensor]]


def reorder_speech_encoder_out(encoder_out: EncoderOut, new_order: Tensor) -> EncoderOut:
    """fairseq's S2T encoder-output reordering (beam search), for the keys our encoders fill."""
    return {
        "encoder_out": [x.index_select(1, new_order) for x in encoder_out["encoder_out"]],
        "encoder_padding_mask": [x.index_select(0, new_order) for x in encoder_out["encoder_padding_mask"]],
        "encoder_embedding": [],
        "encoder_states": [x.index_select(1, new_order) for x in encoder_out["encoder_states"]],
        "src_tokens": [],
        "src_lengths": [x.index_select(0, new_order) for x in encoder_out["src_lengths"]],
    }


def build_frontend(args) -> nn.Module:
    """``--input-layer conv2d`` (masked 4x subsampling to the model width) or ``lfr`` (m x n stacking)."""
    features = args.input_feat_per_channel * args.input_channels
    if args.input_layer == "conv2d":
        return Conv2dSubsampling(features, args.encoder_embed_dim, args.conv_out_channels)
    if args.input_layer == "lfr":
        return LowFrameRate(features, args.lfr_m, args.lfr_n)
    raise ValueError(f"--input-layer must be conv2d or lfr, got '{args.input_layer}'")


class SpeechEncoder(FairseqEncoder):
    """Front-end, ``x·√d`` + sinusoidal positions, dropout, layers, final norm; fairseq S2T output dict.

    Subclasses build ``self.layers`` and implement :meth:`run_layers` on batch-first tensors.
    """

    def __init__(self, args, project_to_model_width: bool = False):
        super().__init__(None)
        self.frontend = build_frontend(args)
        # Layers that keep one width throughout need the front-end output at the model width (LFR gives m x 80).
        self.input_projection = (
            nn.Linear(self.frontend.out_dim, args.encoder_embed_dim)
            if project_to_model_width and self.frontend.out_dim != args.encoder_embed_dim
            else None
        )
        self.embed_scale = math.sqrt(args.encoder_embed_dim)
        self.dropout = nn.Dropout(args.dropout)
        self.after_norm = nn.LayerNorm(args.encoder_embed_dim)
        # CTC head of the joint_ctc_attention criterion, built like the stock s2t_transformer's
        self.ctc_proj = build_ctc_head(args, args.encoder_embed_dim, args.tgt_dict_size)

    def run_layers(self, x: Tensor, padding: Optional[Tensor], states: Optional[List[Tensor]]) -> Tensor:
        """Apply the layers to batch-first ``x``; append each layer's output (T x B x C) to ``states``."""
        raise NotImplementedError

    def forward(self, src_tokens: Tensor, src_lengths: Tensor, return_all_hiddens: bool = False) -> EncoderOut:
        """``src_tokens``: (batch, frames, features) filterbanks; ``src_lengths``: (batch,) frames."""
        if int(self.frontend.output_length(src_lengths).min()) < 1:
            raise ValueError(
                f"an utterance of {int(src_lengths.min())} frames is too short for the {type(self.frontend).__name__} "
                "front-end; filter such utterances out of the manifest"
            )
        x, lengths = self.frontend(src_tokens, src_lengths)
        padding = padding_mask(lengths, x.size(1))
        if self.input_projection is not None:
            x = self.input_projection(x)
        x = x * self.embed_scale + sinusoidal_positions(x.size(1), x.size(2), x.device, x.dtype)
        states: List[Tensor] = []
        x = self.run_layers(self.dropout(x), padding if padding.any() else None, states if return_all_hiddens else None)
        x = self.after_norm(x).transpose(0, 1)
        return {
            "encoder_out": [x],  # T x B x C
            "encoder_padding_mask": [padding] if padding.any() else [],  # B x T
            "encoder_embedding": [],
            "encoder_states": states,  # List[T x B x C]
            "src_tokens": [],
            "src_lengths": [lengths],
        }

    def reorder_encoder_out(self, encoder_out: EncoderOut, new_order: Tensor) -> EncoderOut:
        return reorder_speech_encoder_out(encoder_out, new_order)


class SANMEncoderLayer(nn.Module):
    """Pre-norm SAN-M layer (FunASR ``EncoderLayerSANM``); no residual around attention if width changes."""

    def __init__(self, in_dim: int, args):
        super().__init__()
        dim = args.encoder_embed_dim
        self.self_attn = MultiHeadedAttentionSANM(
            args.encoder_attention_heads, in_dim, dim, args.attention_dropout, args.sanm_kernel_size, args.sanm_shfit
        )
        self.feed_forward = PositionwiseFeedForward(dim, args.encoder_ffn_embed_dim, args.activation_dropout)
        self.norm1 = nn.LayerNorm(in_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(args.dropout)
        self.residual = in_dim == dim

    def forward(self, x: Tensor, padding: Optional[Tensor]) -> Tensor:
        attended = self.dropout(self.self_attn(self.norm1(x), padding))
        x = x + attended if self.residual else attended
        return x + self.dropout(self.feed_forward(self.norm2(x)))


class SANMEncoder(SpeechEncoder):
    def __init__(self, args):
        super().__init__(args)
        widths = [self.frontend.out_dim] + [args.encoder_embed_dim] * (args.encoder_layers - 1)
        self.layers = nn.ModuleList(SANMEncoderLayer(width, args) for width in widths)

    def run_layers(self, x: Tensor, padding: Optional[Tensor], states: Optional[List[Tensor]]) -> Tensor:
        for layer in self.layers:
            x = layer(x, padding)
            if states is not None:
                states.append(x.transpose(0, 1))
        return x


class SANMDecoderLayer(nn.Module):
    """FunASR ``DecoderLayerSANM``: ``x + FSMN(norm2(FFN(norm1 x)))``, then ``+ cross-attention(norm3 x)``.

    The last layer of the stack is FFN-only and returns ``FFN(norm1 x)`` without a residual, as FunASR's
    ``decoders3``.
    """

    def __init__(self, args, ffn_only: bool = False):
        super().__init__()
        dim = args.decoder_embed_dim
        self.feed_forward = DecoderFeedForward(dim, args.decoder_ffn_embed_dim, args.activation_dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = None if ffn_only else CausalFSMN(dim, args.attention_dropout, args.decoder_kernel_size)
        self.src_attn = None if ffn_only else MultiHeadedCrossAttention(
            args.decoder_attention_heads, dim, args.attention_dropout, args.encoder_embed_dim
        )
        if not ffn_only:
            self.norm2 = nn.LayerNorm(dim)
            self.norm3 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(args.dropout)

    def forward(
        self,
        x: Tensor,
        padding: Optional[Tensor],
        memory: Tensor,
        memory_padding: Optional[Tensor],
        incremental_state: Optional[IncrementalState],
    ) -> Tensor:
        hidden = self.feed_forward(self.norm1(x))
        if self.self_attn is None:
            return hidden
        x = x + self.dropout(self.self_attn(self.norm2(hidden), padding, incremental_state))
        return x + self.dropout(self.src_attn(self.norm3(x), memory, memory_padding, incremental_state))


class SANMDecoder(FairseqIncrementalDecoder):
    """FSMN decoder: token embeddings (no positions: the causal FSMN memory carries order), layers, norm."""

    def __init__(self, args, dictionary, embed_tokens: nn.Embedding):
        super().__init__(dictionary)
        dim = args.decoder_embed_dim
        self.embed_tokens = embed_tokens
        self.embed_scale = 1.0 if args.no_scale_embedding else math.sqrt(dim)
        self.padding_idx = embed_tokens.padding_idx
        self.dropout = nn.Dropout(args.dropout)
        self.decoders = nn.ModuleList(SANMDecoderLayer(args) for _ in range(args.decoder_layers))
        self.decoders3 = nn.ModuleList([SANMDecoderLayer(args, ffn_only=True)])
        self.after_norm = nn.LayerNorm(dim)
        self.output_projection = nn.Linear(dim, len(dictionary), bias=False)
        if args.share_decoder_input_output_embed:
            self.output_projection.weight = embed_tokens.weight
        else:
            nn.init.normal_(self.output_projection.weight, mean=0, std=dim**-0.5)
        self.max_target_positions = args.max_target_positions

    def forward(
        self,
        prev_output_tokens: Tensor,
        encoder_out: Optional[EncoderOut] = None,
        incremental_state: Optional[IncrementalState] = None,
        features_only: bool = False,
        **unused,
    ):
        features = self.extract_features(prev_output_tokens, encoder_out, incremental_state)
        # outside incremental decoding the encoder output goes along for CTC (fairseq's S2T convention)
        extra = {"attn": [None], "encoder_out": encoder_out if incremental_state is None else None}
        return (features if features_only else self.output_projection(features)), extra

    def extract_features(
        self, prev_output_tokens: Tensor, encoder_out: Optional[EncoderOut], incremental_state: Optional[IncrementalState] = None, **unused
    ) -> Tensor:
        if incremental_state is not None:
            prev_output_tokens = prev_output_tokens[:, -1:]
        padding = prev_output_tokens.eq(self.padding_idx)
        padding = padding if padding.any() else None
        memory = encoder_out["encoder_out"][0].transpose(0, 1)
        memory_padding = encoder_out["encoder_padding_mask"][0] if encoder_out["encoder_padding_mask"] else None
        x = self.dropout(self.embed_tokens(prev_output_tokens) * self.embed_scale)
        for layer in [*self.decoders, *self.decoders3]:
            x = layer(x, padding, memory, memory_padding, incremental_state)
        return self.after_norm(x)

    def output_layer(self, features: Tensor) -> Tensor:
        return self.output_projection(features)

    def max_positions(self) -> int:
        return self.max_target_positions


def add_speech_frontend_args(parser: argparse.ArgumentParser) -> None:
    """Front-end options shared by the plugin's speech encoders."""
    # fmt: off
    parser.add_argument("--input-layer", choices=["conv2d", "lfr"],
                        help="conv2d: two masked 3x3/stride-2 convolutions (4x fewer frames); "
                             "lfr: FunASR low frame rate stacking of --lfr-m frames every --lfr-n")
    parser.add_argument("--lfr-m", type=int, metavar="M", help="frames stacked per LFR step (FunASR: 7)")
    parser.add_argument("--lfr-n", type=int, metavar="N", help="LFR step in frames (FunASR: 6)")
    # fmt: on


@register_model("s2t_sanm")
class S2TSANMModel(S2TTransformerModel):
    """SAN-M encoder with an FSMN or transformer decoder; every ``s2t_transformer`` option still applies."""

    @staticmethod
    def add_args(parser: argparse.ArgumentParser) -> None:
        S2TTransformerModel.add_args(parser)
        add_speech_frontend_args(parser)
        # fmt: off
        parser.add_argument("--sanm-kernel-size", type=int, metavar="K", help="encoder FSMN kernel size (FunASR: 11)")
        parser.add_argument("--sanm-shfit", type=int, metavar="S",
                            help="encoder FSMN shift: extra left context, fewer future frames (FunASR's spelling)")
        parser.add_argument("--decoder-type", choices=["fsmn", "transformer"],
                            help="fsmn: FunASR's FSMN decoder; transformer: fairseq's transformer decoder")
        parser.add_argument("--decoder-kernel-size", type=int, metavar="K", help="decoder (causal) FSMN kernel size")
        # fmt: on

    @classmethod
    def build_encoder(cls, args) -> SANMEncoder:
        return SANMEncoder(args)

    @classmethod
    def build_decoder(cls, args, task, embed_tokens):
        if args.decoder_type == "transformer":
            return super().build_decoder(args, task, embed_tokens)
        return SANMDecoder(args, task.target_dictionary, embed_tokens)


def speech_model_defaults(args) -> None:
    """Front-end and sizes shared by the plugin's speech models (d 256, 4 heads, FFN 2048, 12 + 6 layers),
    then fairseq's ``s2t_transformer`` defaults for everything else."""
    args.input_layer = getattr(args, "input_layer", "conv2d")
    args.lfr_m = getattr(args, "lfr_m", 7)
    args.lfr_n = getattr(args, "lfr_n", 6)
    args.encoder_embed_dim = getattr(args, "encoder_embed_dim", 256)
    args.encoder_ffn_embed_dim = getattr(args, "encoder_ffn_embed_dim", 2048)
    args.encoder_attention_heads = getattr(args, "encoder_attention_heads", 4)
    args.encoder_layers = getattr(args, "encoder_layers", 12)
    args.decoder_layers = getattr(args, "decoder_layers", 6)
    args.decoder_attention_heads = getattr(args, "decoder_attention_heads", args.encoder_attention_heads)
    args.conv_out_channels = getattr(args, "conv_out_channels", args.encoder_embed_dim)
    args.dropout = getattr(args, "dropout", 0.1)
    s2t_base_architecture(args)


@register_model_architecture("s2t_sanm", "s2t_sanm")
def s2t_sanm_base(args) -> None:
    """FunASR ``SANMEncoder`` defaults (d 256, 4 heads, FFN 2048, FSMN kernel 11) with 12 + 6 layers."""
    args.sanm_kernel_size = getattr(args, "sanm_kernel_size", 11)
    args.sanm_shfit = getattr(args, "sanm_shfit", 0)
    args.decoder_type = getattr(args, "decoder_type", "fsmn")
    args.decoder_kernel_size = getattr(args, "decoder_kernel_size", args.sanm_kernel_size)
    speech_model_defaults(args)


@register_model_architecture("s2t_sanm", "s2t_sanm_s")
def s2t_sanm_s(args) -> None:
    s2t_sanm_base(args)


@register_model_architecture("s2t_sanm", "s2t_sanm_m")
def s2t_sanm_m(args) -> None:
    args.encoder_embed_dim = getattr(args, "encoder_embed_dim", 512)
    args.encoder_attention_heads = getattr(args, "encoder_attention_heads", 8)
    args.dropout = getattr(args, "dropout", 0.15)
    s2t_sanm_base(args)


@register_model_architecture("s2t_sanm", "s2t_sanm_mini")
def s2t_sanm_mini(args) -> None:
    """CPU-sized model for the offline mini recipe: d 144, 6 + 3 layers, FFN 576."""
    args.encoder_embed_dim = getattr(args, "encoder_embed_dim", 144)
    args.encoder_ffn_embed_dim = getattr(args, "encoder_ffn_embed_dim", 576)
    args.encoder_layers = getattr(args, "encoder_layers", 6)
    args.decoder_layers = getattr(args, "decoder_layers", 3)
    args.conv_out_channels = getattr(args, "conv_out_channels", 64)
    s2t_sanm_base(args)
