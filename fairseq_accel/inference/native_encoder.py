"""fairseq's transformer encoder in one C++ call (``csrc/encoder_cpu.cpp``) where its linear layers are int8.

At batch 1 the int8 mini NMT transformer spent ~15 % of a fast decode in its encoder, nearly all of it the Python
of fairseq's attention module path (the path int8 layers take) around a dozen tensor ops per layer. The C++
encoder runs the same ATen ops in the same order on tensors of the same shapes and strides, and the int8 GEMM
the modules call, so its output is the Python encoder's bit for bit. Float32 encoders stay fairseq's own: stock
runs their attention through ``F.multi_head_attention_forward``, and the fast generator's float32 output must be
stock's exactly.
"""
import logging
from typing import Dict, List, Optional

import torch
from fairseq.models.transformer import TransformerEncoder, TransformerEncoderBase
from fairseq.modules.transformer_layer import TransformerEncoderLayer, TransformerEncoderLayerBase
from torch import Tensor, nn

from fairseq_accel.inference.cpu_kernels import (
    NativeStepUnsupported,
    cpu_kernels_available,
    native_activation,
    native_kernels,
    native_linear,
    native_norm,
)
from fairseq_accel.inference.position_table import PositionTable
from fairseq_accel.modules.int8_linear import Int8Linear

logger = logging.getLogger(__name__)
ENCODER_CLASSES = (TransformerEncoderBase, TransformerEncoder)
LAYER_CLASSES = (TransformerEncoderLayerBase, TransformerEncoderLayer)


class NativeEncoder:
    """``encoder.forward_torchscript(net_input)`` for translation inputs (``src_tokens``), by the C++ encoder."""

    def __init__(self, encoder: nn.Module, native):
        self.encoder = encoder
        self.native = native
        self.position_table = (None if encoder.embed_positions is None
                               else PositionTable(encoder.embed_positions, encoder.dictionary.eos()))

    def __call__(self, net_input: Dict[str, Tensor]) -> Dict[str, List[Tensor]]:
        src_tokens = net_input["src_tokens"]
        lengths = src_tokens.ne(self.encoder.padding_idx).sum(dim=1, dtype=torch.int32)
        encoder_out, padding, embedding = self.native(src_tokens, self._positions(src_tokens, lengths))
        return {"encoder_out": [encoder_out], "encoder_padding_mask": [padding], "encoder_embedding": [embedding],
                "encoder_states": [], "fc_results": [], "src_tokens": [], "src_lengths": [lengths.reshape(-1, 1)]}

    def _positions(self, src_tokens: Tensor, lengths: Tensor) -> Optional[Tensor]:
        """The encoder's positional embeddings of ``src_tokens``: without padding (every batch of one sentence)
        each row's are the table's first ones, as the module would number and look them up."""
        if self.position_table is None:
            return None
        batch, width = src_tokens.shape
        if bool(lengths.eq(width).all()):
            return self.position_table.first(width, src_tokens.device).expand(batch, width, -1)
        return self.encoder.embed_positions(src_tokens)


def build_native_encoder(encoder: nn.Module) -> Optional[NativeEncoder]:
    """The C++ twin of ``encoder``, or None where it runs as it is: not fairseq's transformer encoder, float32
    layers (silently: that is stock's own encoder), or, with one notice line, int8 layers it cannot take."""
    linears = [m for m in encoder.modules() if isinstance(m, (nn.Linear, Int8Linear))]
    if not cpu_kernels_available() or not any(isinstance(m, Int8Linear) for m in linears):
        return None
    try:
        native = NativeEncoder(encoder, _native_encoder(encoder, linears))
        logger.info("the int8 encoder runs in C++ (csrc/encoder_cpu.cpp, one call per batch)")
        return native
    except NativeStepUnsupported as reason:
        logger.info(f"the int8 encoder runs in Python: {reason}")
        return None


def _native_encoder(encoder: nn.Module, linears: List[nn.Module]):
    if type(encoder) not in ENCODER_CLASSES:
        raise NativeStepUnsupported(f"{type(encoder).__name__} is not fairseq's transformer encoder")
    if encoder.quant_noise is not None or encoder.embed_tokens.weight.device.type != "cpu":
        raise NativeStepUnsupported("the encoder uses quant-noise or is not on the CPU")
    float_layers = [m for m in linears if not isinstance(m, Int8Linear) or m.native_weights() is None]
    if float_layers:  # float32 layers would need F.linear's own path on fairseq's strided inputs
        raise NativeStepUnsupported(f"{len(float_layers)} of its linear layers are not int8")
    optional_norm = lambda norm: None if norm is None else native_norm(norm)
    return native_kernels().TransformerEncoder(
        encoder.embed_tokens.weight.detach(), float(encoder.embed_scale), encoder.padding_idx,
        optional_norm(encoder.layernorm_embedding), [_native_layer(layer) for layer in encoder.layers],
        optional_norm(encoder.layer_norm))


def _native_layer(layer: nn.Module):
    kernels = native_kernels()
    if type(layer) not in LAYER_CLASSES or layer.return_fc:
        raise NativeStepUnsupported(f"an encoder layer is {type(layer).__name__}")
    attention = layer.self_attn
    if attention.bias_k is not None or attention.add_zero_attn or not attention.self_attention:
        raise NativeStepUnsupported("encoder self-attention uses add_bias_kv/add_zero_attn")
    self_attention = kernels.EncoderSelfAttention(
        *(native_linear(p) for p in (attention.q_proj, attention.k_proj, attention.v_proj, attention.out_proj)),
        attention.num_heads, attention.head_dim, attention.scaling)
    feed_forward = kernels.FeedForward(native_linear(layer.fc1), native_activation(layer.activation_fn), None,
                                       native_linear(layer.fc2))
    return kernels.EncoderLayer(layer.normalize_before, native_norm(layer.self_attn_layer_norm), self_attention,
                                native_norm(layer.final_layer_norm), feed_forward)
