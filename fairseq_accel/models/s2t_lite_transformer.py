"""Lite Transformer (LSRA) encoder for speech recognition: ``s2t_lite_transformer``.

fairseq's ``s2t_transformer`` with its encoder layers replaced by the LSRA layers of
:mod:`fairseq_accel.models.lite_transformer` (attention beside a convolution, arXiv:2004.11886) behind the
plugin's padding-exact speech front-end; the decoder is fairseq's transformer decoder.
"""
import argparse
from typing import List, Optional

from fairseq.models import register_model, register_model_architecture
from fairseq.models.speech_to_text.s2t_transformer import S2TTransformerModel
from fairseq.models.transformer import TransformerConfig
from torch import Tensor, nn

from fairseq_accel.models.lite_transformer import (
    LiteTransformerEncoderLayer,
    add_lsra_args,
    kernel_size_hint,
    lsra_defaults,
)
from fairseq_accel.models.speech_encoder import (
    SpeechEncoder,
    add_speech_frontend_args,
    load_pretrained_encoder,
    speech_model_defaults,
)
from fairseq_accel.modules.branch_spec import resolve_layer_branches
from fairseq_accel.modules.layer_sharing import SharedLayersModel, add_layer_sharing_args


class S2TLiteTransformerEncoder(SpeechEncoder):
    def __init__(self, args):
        super().__init__(args, project_to_model_width=True)
        cfg = TransformerConfig.from_namespace(args)
        branches = resolve_layer_branches(
            args.encoder_branch_type, args.encoder_kernel_size_list, args.encoder_layers,
            args.encoder_embed_dim, "encoder",
        )
        self.layers = nn.ModuleList(LiteTransformerEncoderLayer(cfg, layer) for layer in branches)

    def run_layers(self, x: Tensor, padding: Optional[Tensor], states: Optional[List[Tensor]]) -> Tensor:
        frames = self.valid_frames(padding)
        if frames is None:
            x = x.transpose(0, 1)  # fairseq layers are time-first
            for layer in self.layers:
                x = layer(x, encoder_padding_mask=padding)
                if states is not None:
                    states.append(x)
            return x.transpose(0, 1)
        # The valid frames as a (frames, 1, dim) "sequence": fairseq's layer runs its norms and feed-forward on it,
        # and hands ``frames`` to its self-attention (it passes the padding mask on and uses it nowhere else),
        # which is LSRA's MultiBranch: it unpacks for its branches.
        x = frames.pack(x).unsqueeze(1)
        for layer in self.layers:
            x = layer(x, encoder_padding_mask=frames)
            if states is not None:
                states.append(frames.unpack(x.squeeze(1)).transpose(0, 1))
        return frames.unpack(x.squeeze(1))


@register_model("s2t_lite_transformer")
class S2TLiteTransformerModel(SharedLayersModel, S2TTransformerModel):
    """LSRA speech encoder + transformer decoder; every ``s2t_transformer`` option still applies, and
    cross-layer weight sharing."""

    @staticmethod
    def add_args(parser: argparse.ArgumentParser) -> None:
        S2TTransformerModel.add_args(parser)
        add_speech_frontend_args(parser)
        add_lsra_args(parser, sides=("encoder",))
        add_layer_sharing_args(parser)

    @classmethod
    def sharing_hints(cls, args):
        return {"encoder": kernel_size_hint("encoder")}

    @classmethod
    def build_encoder(cls, args) -> S2TLiteTransformerEncoder:
        return load_pretrained_encoder(S2TLiteTransformerEncoder(args), args)


@register_model_architecture("s2t_lite_transformer", "s2t_lite_transformer_s")
def s2t_lite_transformer_s(args) -> None:
    """s2t_transformer_s sizes (d 256, 4 heads, 12 + 6 layers, FFN 2048) with LSRA encoder layers:
    half the channels to attention, half to a lightweight convolution (kernels 3, 7, 15, then 31)."""
    speech_model_defaults(args)
    lsra_defaults(args, conv_type="lightweight", glu=False, sides=("encoder",))
