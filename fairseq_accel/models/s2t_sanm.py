"""SAN-M speech recognition for fairseq's ``speech_to_text`` task (FunASR's SAN-M, arXiv:2006.01713).

``s2t_sanm`` is fairseq's ``s2t_transformer`` with
* a SAN-M encoder: a masked conv2d (4x) or LFR front-end, then pre-norm layers whose self-attention
  carries an FSMN memory block; a first layer may change the width and then has no residual (FunASR
  ``SANMEncoder``: LFR features of 7x80 dims go straight into the first layer);
* an FSMN decoder (FunASR ``FsmnDecoder``): no self-attention, each layer is FFN -> causal FSMN memory
  -> cross-attention, then one FFN-only layer — or fairseq's transformer decoder (``--decoder-type``).
Everything else (task, data, generation) is stock fairseq.

Checkpoints of earlier versions load unchanged: their ``decoder.decoders3.0.*`` weights (FunASR's name of
the FFN-only layer) are mapped to ``decoder.final_ffn.*``, and their ``sanm_shfit`` option is read as
``--sanm-shift``.
"""
import argparse
import math
from typing import Dict, List, Optional

from fairseq.models import FairseqIncrementalDecoder, register_model, register_model_architecture
from fairseq.models.speech_to_text.s2t_transformer import S2TTransformerModel
from torch import Tensor, nn

from fairseq_accel.models.option_checks import fill_default
from fairseq_accel.models.speech_encoder import (
    SpeechEncoder,
    add_speech_frontend_args,
    load_pretrained_encoder,
    speech_model_defaults,
)
from fairseq_accel.modules.encoder_decoder_types import EncoderOut, IncrementalState
from fairseq_accel.modules.layer_sharing import SharedLayersModel, add_layer_sharing_args
from fairseq_accel.modules.padding_removal import ValidFrames
from fairseq_accel.modules.sanm_attention import (
    CausalFSMN,
    DecoderFeedForward,
    MultiHeadedAttentionSANM,
    MultiHeadedCrossAttention,
    PositionwiseFeedForward,
)

# FunASR spells the FSMN shift option ``sanm_shfit``; both spellings are accepted, ``--sanm-shift`` is documented.
SANM_SHIFT_SPELLINGS = {"sanm_shift": "--sanm-shift", "sanm_shfit": "--sanm-shfit"}


class SanmShiftOption(argparse.Action):
    """Store ``--sanm-shift`` / ``--sanm-shfit``; the two spellings given with different values is an error."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        for dest, option in SANM_SHIFT_SPELLINGS.items():
            other = getattr(namespace, dest, None)
            if dest != self.dest and other is not None and other != values:
                parser.error(
                    f"{option_string} {values} contradicts {option} {other}: give the shift once "
                    "(--sanm-shfit is FunASR's spelling of --sanm-shift)"
                )
        setattr(namespace, self.dest, values)


def sanm_shift(args) -> int:
    """The encoder FSMN shift of ``args``: ``sanm_shift``, or ``sanm_shfit`` (FunASR's spelling, and the only
    one in checkpoints of earlier versions); 0 when neither is set."""
    given = {dest: getattr(args, dest, None) for dest in SANM_SHIFT_SPELLINGS}
    values = {value for value in given.values() if value is not None}
    if len(values) > 1:
        raise ValueError(f"sanm_shift {given['sanm_shift']} contradicts sanm_shfit {given['sanm_shfit']}: give the shift once")
    return values.pop() if values else 0


class SANMEncoderLayer(nn.Module):
    """Pre-norm SAN-M layer (FunASR ``EncoderLayerSANM``); no residual around attention if width changes."""

    def __init__(self, in_dim: int, args):
        super().__init__()
        dim = args.encoder_embed_dim
        self.self_attn = MultiHeadedAttentionSANM(
            args.encoder_attention_heads, in_dim, dim, args.attention_dropout, args.sanm_kernel_size, sanm_shift(args)
        )
        self.feed_forward = PositionwiseFeedForward(
            dim, args.encoder_ffn_embed_dim, args.activation_dropout, args.activation_fn
        )
        self.norm1 = nn.LayerNorm(in_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(args.dropout)
        self.residual = in_dim == dim

    def forward(self, x: Tensor, padding: Optional[Tensor], frames: Optional[ValidFrames] = None) -> Tensor:
        """``x``: (batch, time, in_dim), or with ``frames`` the packed valid frames (frames, in_dim)."""
        normed = self.norm1(x)
        attended = self.self_attn(normed, padding) if frames is None else self.self_attn.forward_packed(normed, frames)
        attended = self.dropout(attended)
        x = x + attended if self.residual else attended
        return x + self.dropout(self.feed_forward(self.norm2(x)))


class SANMEncoder(SpeechEncoder):
    def __init__(self, args):
        super().__init__(args)
        widths = [self.frontend.out_dim] + [args.encoder_embed_dim] * (args.encoder_layers - 1)
        self.layers = nn.ModuleList(SANMEncoderLayer(width, args) for width in widths)

    def run_layers(self, x: Tensor, padding: Optional[Tensor], states: Optional[List[Tensor]]) -> Tensor:
        frames = self.valid_frames(padding)
        if frames is not None:
            x = frames.pack(x)
        for layer in self.layers:
            x = layer(x, padding, frames)
            if states is not None:
                states.append((x if frames is None else frames.unpack(x)).transpose(0, 1))
        return x if frames is None else frames.unpack(x)


class SANMDecoderLayer(nn.Module):
    """FunASR ``DecoderLayerSANM``: ``x + FSMN(norm2(FFN(norm1 x)))``, then ``+ cross-attention(norm3 x)``.

    The last layer of the stack is FFN-only and returns ``FFN(norm1 x)`` without a residual (FunASR's
    ``decoders3``).
    """

    def __init__(self, args, ffn_only: bool = False):
        super().__init__()
        dim = args.decoder_embed_dim
        self.feed_forward = DecoderFeedForward(dim, args.decoder_ffn_embed_dim, args.activation_dropout, args.activation_fn)
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
    """FSMN decoder: token embeddings (no positions: the causal FSMN memory carries order), the FSMN layers
    ``decoders``, the FFN-only layer ``final_ffn``, norm."""

    def __init__(self, args, dictionary, embed_tokens: nn.Embedding):
        super().__init__(dictionary)
        dim = args.decoder_embed_dim
        self.embed_tokens = embed_tokens
        self.embed_scale = 1.0 if args.no_scale_embedding else math.sqrt(dim)
        self.padding_idx = embed_tokens.padding_idx
        self.dropout = nn.Dropout(args.dropout)
        self.decoders = nn.ModuleList(SANMDecoderLayer(args) for _ in range(args.decoder_layers))
        self.final_ffn = SANMDecoderLayer(args, ffn_only=True)
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
        for layer in [*self.decoders, self.final_ffn]:
            x = layer(x, padding, memory, memory_padding, incremental_state)
        return self.after_norm(x)

    def output_layer(self, features: Tensor) -> Tensor:
        return self.output_projection(features)

    def max_positions(self) -> int:
        return self.max_target_positions

    def upgrade_state_dict_named(self, state_dict: Dict[str, Tensor], name: str) -> Dict[str, Tensor]:
        """Rename the FFN-only layer's weights of earlier checkpoints: ``decoders3.0.*`` -> ``final_ffn.*``."""
        prefix = f"{name}." if name else ""
        old, new = f"{prefix}decoders3.0.", f"{prefix}final_ffn."
        for key in [key for key in state_dict if key.startswith(old)]:
            state_dict[new + key[len(old):]] = state_dict.pop(key)
        return state_dict


@register_model("s2t_sanm")
class S2TSANMModel(SharedLayersModel, S2TTransformerModel):
    """SAN-M encoder with an FSMN or transformer decoder; every ``s2t_transformer`` option still applies, and
    cross-layer weight sharing (the FSMN decoder's FFN-only last layer stays unshared)."""

    @staticmethod
    def add_args(parser: argparse.ArgumentParser) -> None:
        S2TTransformerModel.add_args(parser)
        add_speech_frontend_args(parser)
        # fmt: off
        parser.add_argument("--sanm-kernel-size", type=int, metavar="K", help="encoder FSMN kernel size (FunASR: 11)")
        parser.add_argument("--sanm-shift", type=int, metavar="S", action=SanmShiftOption,
                            help="encoder FSMN shift: extra left context, fewer future frames (FunASR: sanm_shfit)")
        parser.add_argument("--sanm-shfit", type=int, action=SanmShiftOption, help=argparse.SUPPRESS)
        parser.add_argument("--decoder-type", choices=["fsmn", "transformer"],
                            help="fsmn: FunASR's FSMN decoder; transformer: fairseq's transformer decoder")
        parser.add_argument("--decoder-kernel-size", type=int, metavar="K", help="decoder (causal) FSMN kernel size")
        # fmt: on
        add_layer_sharing_args(parser)

    @classmethod
    def layer_stacks(cls, model):
        decoder = model.decoder
        return {"encoder": model.encoder.layers,
                "decoder": decoder.decoders if isinstance(decoder, SANMDecoder) else decoder.layers}

    @classmethod
    def sharing_hints(cls, args):
        return {"encoder": "the first layer takes the front-end's width; keep it alone, e.g. --encoder-share-map "
                           "0,1,1,3,3,..."}

    @classmethod
    def build_encoder(cls, args) -> SANMEncoder:
        return load_pretrained_encoder(SANMEncoder(args), args)

    @classmethod
    def build_decoder(cls, args, task, embed_tokens):
        if args.decoder_type == "transformer":
            return super().build_decoder(args, task, embed_tokens)
        return SANMDecoder(args, task.target_dictionary, embed_tokens)


@register_model_architecture("s2t_sanm", "s2t_sanm")
def s2t_sanm_base(args, conv_out_channels: Optional[int] = None) -> None:
    """FunASR ``SANMEncoder`` defaults (d 256, 4 heads, FFN 2048, FSMN kernel 11) with 12 + 6 layers.

    SAN-M layers and the FSMN decoder are pre-norm only, and the FSMN decoder has no embedding norm:
    the stock options that would change that are refused unless they have their default.
    """
    args.sanm_kernel_size = getattr(args, "sanm_kernel_size", 11)
    args.sanm_shift = sanm_shift(args)
    if hasattr(args, "sanm_shfit"):
        del args.sanm_shfit  # one spelling in the saved config
    args.decoder_type = getattr(args, "decoder_type", "fsmn")
    fsmn_only = None if args.decoder_type == "fsmn" else f"applies to --decoder-type fsmn only, got --decoder-type {args.decoder_type}"
    fill_default(args, "decoder_kernel_size", args.sanm_kernel_size, fsmn_only)
    fill_default(args, "encoder_normalize_before", True, "does not apply: SAN-M encoder layers are pre-norm only")
    transformer_only = None if args.decoder_type == "transformer" else "applies to --decoder-type transformer only (the FSMN decoder is pre-norm, without an embedding norm)"
    fill_default(args, "decoder_normalize_before", True, transformer_only)
    fill_default(args, "layernorm_embedding", False, transformer_only)
    speech_model_defaults(args, conv_out_channels)


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
    s2t_sanm_base(args, conv_out_channels=64)
