"""The speech encoder shared by the plugin's speech models (``s2t_sanm``, ``s2t_lite_transformer``).

:class:`SpeechEncoder` is the part that does not depend on the layers: a padding-exact front-end
(``--input-layer conv2d`` or FunASR's ``lfr``), ``x·√d`` plus sinusoidal positions, dropout, the layers a
subclass builds, a final norm, the optional CTC head, and fairseq's S2T encoder-output dict. Also here: the
front-end options and the sizes both speech models default to.
"""
import argparse
import logging
import math
from pathlib import Path
from typing import List, Optional

import torch
from fairseq import checkpoint_utils
from fairseq.models import FairseqEncoder
from fairseq.models.speech_to_text.s2t_transformer import base_architecture as s2t_base_architecture
from torch import Tensor, nn

from fairseq_accel.models.ctc_head import build_ctc_head
from fairseq_accel.models.option_checks import fill_default
from fairseq_accel.modules.encoder_decoder_types import EncoderOut
from fairseq_accel.modules.padding_removal import ValidFrames
from fairseq_accel.modules.speech_frontend import Conv2dSubsampling, LowFrameRate, padding_mask, sinusoidal_positions

logger = logging.getLogger(__name__)


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


def input_features(args) -> int:
    """Features per input frame: fairseq's speech_to_text task sets both factors from its data config."""
    return args.input_feat_per_channel * args.input_channels


def build_frontend(args) -> nn.Module:
    """``--input-layer conv2d`` (masked 4x subsampling to the model width) or ``lfr`` (m x n stacking)."""
    features = input_features(args)
    if args.input_layer == "conv2d":
        return Conv2dSubsampling(features, args.encoder_embed_dim, args.conv_out_channels)
    if args.input_layer == "lfr":
        return LowFrameRate(features, args.lfr_m, args.lfr_n)
    raise ValueError(f"--input-layer must be conv2d or lfr, got '{args.input_layer}'")


class SpeechEncoder(FairseqEncoder):
    """Front-end, ``x·√d`` + sinusoidal positions, dropout, layers, final norm; fairseq S2T output dict.

    Subclasses build ``self.layers`` and implement :meth:`run_layers` on batch-first tensors. In inference they
    run the layers' position-wise parts on the valid frames only (:meth:`valid_frames`): the same outputs at valid
    frames, zeros at padding. Training keeps the padded layout (its dropout masks, and so earlier runs, stay as
    they were).
    """

    remove_padding = True  # False: inference on the padded layout too (fairseq-accel-benchmark-encoder compares)

    def __init__(self, args, project_to_model_width: bool = False):
        super().__init__(None)
        self.input_features = input_features(args)
        self.frontend = build_frontend(args)
        # Layers that keep one width throughout need the front-end output at the model width (LFR gives m x 80).
        self.input_projection = (
            nn.Linear(self.frontend.out_dim, args.encoder_embed_dim)
            if project_to_model_width and self.frontend.out_dim != args.encoder_embed_dim
            else None
        )
        self.embed_scale = 1.0 if args.no_scale_embedding else math.sqrt(args.encoder_embed_dim)
        self.dropout = nn.Dropout(args.dropout)
        # a final norm after pre-norm layers (post-norm layers end normalised), as fairseq's S2T encoder
        self.after_norm = nn.LayerNorm(args.encoder_embed_dim) if args.encoder_normalize_before else None
        # --encoder-freezing-updates: no encoder gradients for the first N updates (fairseq's S2T encoder)
        self.encoder_freezing_updates = args.encoder_freezing_updates
        self.num_updates = 0
        # CTC head of the joint_ctc_attention criterion, built like the stock s2t_transformer's
        self.ctc_proj = build_ctc_head(args, args.encoder_embed_dim, args.tgt_dict_size)

    def run_layers(self, x: Tensor, padding: Optional[Tensor], states: Optional[List[Tensor]]) -> Tensor:
        """Apply the layers to batch-first ``x``; append each layer's output (T x B x C) to ``states``."""
        raise NotImplementedError

    def valid_frames(self, padding: Optional[Tensor]) -> Optional[ValidFrames]:
        """Where to pack the layers' inputs, or None to keep the padded layout (training, no padding)."""
        return ValidFrames.of(padding) if self.remove_padding and not self.training else None

    def set_num_updates(self, num_updates: int) -> None:
        super().set_num_updates(num_updates)
        self.num_updates = num_updates

    def forward(self, src_tokens: Tensor, src_lengths: Tensor, return_all_hiddens: bool = False) -> EncoderOut:
        """``src_tokens``: (batch, frames, features) filterbanks; ``src_lengths``: (batch,) frames."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.num_updates >= self.encoder_freezing_updates):
            return self.encode(src_tokens, src_lengths, return_all_hiddens)

    def encode(self, src_tokens: Tensor, src_lengths: Tensor, return_all_hiddens: bool) -> EncoderOut:
        """:meth:`forward` without the freezing."""
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
        if self.after_norm is not None:
            x = self.after_norm(x)
        x = x.transpose(0, 1)
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


def load_pretrained_encoder(encoder: SpeechEncoder, args) -> SpeechEncoder:
    """``--load-pretrained-encoder-from``: initialise ``encoder`` from a checkpoint's ``encoder.*`` weights,
    as fairseq's ``S2TTransformerModel.build_encoder`` does (a missing file is logged and skipped there too:
    a checkpoint trained this way must load where the pretrained file is not)."""
    path = getattr(args, "load_pretrained_encoder_from", None)
    if path is None:
        return encoder
    if not Path(path).exists():
        logger.warning(f"--load-pretrained-encoder-from {path}: no such file; the encoder starts from scratch")
        return encoder
    encoder = checkpoint_utils.load_pretrained_component_from_model(component=encoder, checkpoint=path)
    logger.info(f"loaded pretrained encoder from: {path}")
    return encoder


def add_speech_frontend_args(parser: argparse.ArgumentParser) -> None:
    """Front-end options shared by the plugin's speech encoders."""
    # fmt: off
    parser.add_argument("--input-layer", choices=["conv2d", "lfr"],
                        help="conv2d: two masked 3x3/stride-2 convolutions (4x fewer frames); "
                             "lfr: FunASR low frame rate stacking of --lfr-m frames every --lfr-n")
    parser.add_argument("--lfr-m", type=int, metavar="M", help="frames stacked per LFR step (FunASR: 7)")
    parser.add_argument("--lfr-n", type=int, metavar="N", help="LFR step in frames (FunASR: 6)")
    # fmt: on


# FunASR's LFR stacking: 7 frames every 6.
LFR_DEFAULTS = {"lfr_m": 7, "lfr_n": 6}
# The options of fairseq's own subsamplers, which the plugin's front-ends replace.
STOCK_SUBSAMPLER_OPTIONS = ("conv_kernel_sizes", "conv_channels", "conv_version")


def stock_s2t_defaults() -> argparse.Namespace:
    """What fairseq's ``s2t_transformer`` architecture sets when nothing is given."""
    defaults = argparse.Namespace()
    s2t_base_architecture(defaults)
    return defaults


def frontend_defaults(args, conv_out_channels: Optional[int]) -> None:
    """Fill the front-end options; refuse those the chosen ``--input-layer`` would ignore (unless default)."""
    args.input_layer = getattr(args, "input_layer", "conv2d")
    got = f"got --input-layer {args.input_layer}"
    for name, default in LFR_DEFAULTS.items():
        fill_default(args, name, default, None if args.input_layer == "lfr" else f"applies to --input-layer lfr only, {got}")
    fill_default(args, "conv_out_channels", conv_out_channels or args.encoder_embed_dim,
                 None if args.input_layer == "conv2d" else f"applies to --input-layer conv2d only, {got}")
    stock = stock_s2t_defaults()
    for name in STOCK_SUBSAMPLER_OPTIONS:
        fill_default(args, name, getattr(stock, name), "configures fairseq's subsampler, which the plugin's speech "
                     f"encoders replace with their own front-end (--input-layer conv2d or lfr), {got}")


def speech_model_defaults(args, conv_out_channels: Optional[int] = None) -> None:
    """Front-end and sizes shared by the plugin's speech models (d 256, 4 heads, FFN 2048, 12 + 6 layers;
    ``conv_out_channels`` defaults to the model width), then fairseq's ``s2t_transformer`` defaults for
    everything else."""
    args.encoder_embed_dim = getattr(args, "encoder_embed_dim", 256)
    frontend_defaults(args, conv_out_channels)
    args.encoder_ffn_embed_dim = getattr(args, "encoder_ffn_embed_dim", 2048)
    args.encoder_attention_heads = getattr(args, "encoder_attention_heads", 4)
    args.encoder_layers = getattr(args, "encoder_layers", 12)
    args.decoder_layers = getattr(args, "decoder_layers", 6)
    args.decoder_attention_heads = getattr(args, "decoder_attention_heads", args.encoder_attention_heads)
    args.dropout = getattr(args, "dropout", 0.1)
    s2t_base_architecture(args)
