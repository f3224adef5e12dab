"""Fast step of the SAN-M FSMN decoder (``s2t_sanm`` with ``--decoder-type fsmn``).

Its only state is each layer's causal FSMN window (the last K inputs, a ``WindowCache`` read through the
beam indirection) and the cross-attention keys/values, computed once per sentence. It has no
self-attention, so there is no K/V cache for ``--kv-cache-dtype`` to store.
"""
from types import ModuleType
from typing import Dict, List, Optional

import torch.nn.functional as F
from torch import Tensor

from fairseq_accel.inference.beam_cache import BeamState, CrossAttentionMemory, WindowCache
from fairseq_accel.inference.cpu_kernels import (
    native_activation,
    native_cross_attention,
    native_kernels,
    native_linear,
    native_norm,
    resolve_cpu_kernels,
)
from fairseq_accel.inference.fast_decoder import (
    FastDecoder,
    FastDecodingOptions,
    layer_norm,
    register_fast_decoder,
)
from fairseq_accel.inference.int8_execution import (
    fused_linear_step,
    linear_step,
    log_int8_attention,
    output_level_steps,
)
from fairseq_accel.models.s2t_sanm import SANMDecoder, SANMDecoderLayer
from fairseq_accel.modules.sanm_attention import CausalFSMN, DecoderFeedForward, MultiHeadedCrossAttention


class FeedForwardStep:
    """``DecoderFeedForward``: ``w_2(norm(activation(w_1 x)))``."""

    def __init__(self, ffn: DecoderFeedForward):
        self.ffn = ffn
        self.w_1, self.w_2 = linear_step(ffn.w_1), linear_step(ffn.w_2)

    def __call__(self, x: Tensor) -> Tensor:
        return self.w_2(layer_norm(self.ffn.activation_fn(self.w_1(x)), self.ffn.norm))

    def native(self):
        return native_kernels().FeedForward(native_linear(self.w_1), native_activation(self.ffn.activation_fn),
                                            native_norm(self.ffn.norm), native_linear(self.w_2))


class FSMNStep:
    """``CausalFSMN``: depthwise causal convolution over the last K inputs, plus the input."""

    def __init__(self, fsmn: CausalFSMN):
        self.kernel_size = fsmn.kernel_size
        self.weight = fsmn.fsmn_block.weight.squeeze(1).t().contiguous()  # K x C
        self.window: Optional[WindowCache] = None

    def start(self, state: BeamState) -> None:
        self.window = state.add(
            WindowCache(state.indirection, self.kernel_size, self.weight.size(1), self.weight.dtype, self.weight.device,
                        state.cpu_kernels)
        )

    def __call__(self, x: Tensor) -> Tensor:
        return self.window.convolve(x, self.weight) + x


class SANMCrossAttentionStep:
    """``MultiHeadedCrossAttention``: fused K/V projection of the encoder output once per sentence (int8
    levels straight from it on the int8 attention path, as in ``transformer_step.CrossAttentionStep``)."""

    def __init__(self, attention: MultiHeadedCrossAttention, options: FastDecodingOptions):
        self.attention = attention
        self.heads, self.head_dim = attention.h, attention.d_k
        scale = self.head_dim**-0.5  # scaled_dot_product_attention's default scale
        q_weight = attention.linear_q.weight.detach()
        self.q = fused_linear_step([attention.linear_q], [q_weight.new_full((q_weight.size(0),), scale)])
        self.out = linear_step(attention.linear_out)
        self.memory: Optional[CrossAttentionMemory] = None
        steps = output_level_steps(attention.linear_k_v, self.heads, self.head_dim)  # [2, H, D]: keys, values
        self.level_steps = None if steps is None or options.cross_kv_dtype != "int8" else (steps[0], steps[1])

    def start(self, state: BeamState, options: FastDecodingOptions, memory: Tensor, padding_mask: Optional[Tensor]) -> None:
        """``memory``: encoder output ``[B, S, C]``."""
        if self.level_steps is None:
            k, v = self.attention._keys_values(memory)
        else:
            batch, time, _ = memory.shape
            levels = self.attention.linear_k_v.forward_levels(memory).view(batch, time, 2, self.heads, self.head_dim)
            k, v = levels.permute(2, 0, 3, 1, 4).unbind(0)  # B x H x S x D each
        self.memory = state.add(CrossAttentionMemory(
            k.contiguous(), v.contiguous(), padding_mask, state.beam, options.cross_kv_dtype, options.key_scale,
            self.level_steps, state.cpu_kernels,
        ))

    def __call__(self, x: Tensor) -> Tensor:
        rows = x.size(0)
        q = self.q(x).view(rows, self.heads, self.head_dim)
        return self.out(self.memory.attend(q).reshape(rows, self.heads * self.head_dim))

    def native(self):
        return native_cross_attention(self.q, self.out, self.heads, self.head_dim, self.level_steps)


class SANMLayerStep:
    """``SANMDecoderLayer``: ``x + FSMN(norm2(FFN(norm1 x)))``, then ``+ cross-attention(norm3 x)``; the
    FFN-only last layer returns ``FFN(norm1 x)``."""

    def __init__(self, layer: SANMDecoderLayer, options: FastDecodingOptions):
        self.layer = layer
        self.feed_forward = FeedForwardStep(layer.feed_forward)
        self.fsmn = None if layer.self_attn is None else FSMNStep(layer.self_attn)
        self.cross_attn = None if layer.src_attn is None else SANMCrossAttentionStep(layer.src_attn, options)

    def start(self, state: BeamState, options: FastDecodingOptions, memory: Tensor, padding_mask: Optional[Tensor]) -> None:
        if self.fsmn is not None:
            self.fsmn.start(state)
            self.cross_attn.start(state, options, memory, padding_mask)

    def __call__(self, x: Tensor) -> Tensor:
        layer = self.layer
        hidden = self.feed_forward(layer_norm(x, layer.norm1))
        if self.fsmn is None:
            return hidden
        x = x + self.fsmn(layer_norm(hidden, layer.norm2))
        return x + self.cross_attn(layer_norm(x, layer.norm3))

    def native(self):
        """This layer as the C++ step's ``SANMLayer``."""
        layer, kernels = self.layer, native_kernels()
        if self.fsmn is None:
            return kernels.SANMLayer(native_norm(layer.norm1), self.feed_forward.native(), None, None, None, None)
        return kernels.SANMLayer(native_norm(layer.norm1), self.feed_forward.native(), native_norm(layer.norm2),
                                 self.fsmn.weight.detach(), self.cross_attn.native(), native_norm(layer.norm3))


class FastSANMDecoder(FastDecoder):
    """``SANMDecoder.extract_features`` + output projection for one token per hypothesis."""

    def __init__(self, decoder: SANMDecoder, options: FastDecodingOptions, kernels: Optional[ModuleType] = None):
        """``kernels`` is accepted for the builder interface; this decoder has no cache the kernels serve."""
        self.decoder = decoder
        self.options = options
        self.layers = [SANMLayerStep(layer, options) for layer in [*decoder.decoders, decoder.final_ffn]]
        log_int8_attention(sum(layer.cross_attn.level_steps is not None for layer in self.layers if layer.cross_attn))
        self.output_projection = linear_step(decoder.output_projection)  # W^T stored once: the largest GEMM

    def has_self_attention_cache(self) -> bool:
        return False

    def start(self, encoder_out: Dict[str, List[Tensor]], beam: int, max_steps: int) -> None:
        memory = encoder_out["encoder_out"][0].transpose(0, 1)
        padding = encoder_out["encoder_padding_mask"][0] if encoder_out.get("encoder_padding_mask") else None
        self.state = BeamState(memory.size(0), beam, max_steps, memory.device,
                               cpu_kernels=resolve_cpu_kernels(self.options.kernel_choice, memory.device))
        for layer in self.layers:
            layer.start(self.state, self.options, memory, padding)
        self.bind_native_step()

    def build_native_step(self):
        decoder = self.decoder
        return native_kernels().DecoderStep(
            decoder.embed_tokens.weight.detach(), float(decoder.embed_scale), None,
            [layer.native() for layer in self.layers], native_norm(decoder.after_norm),
            native_linear(self.output_projection),
        )

    def step(self, tokens: Tensor, output_rows: Optional[Tensor] = None) -> Tensor:
        if self.native_caches is not None:
            return self.native_logits(tokens, output_rows)
        decoder = self.decoder
        x = F.embedding(tokens, decoder.embed_tokens.weight) * decoder.embed_scale
        for layer in self.layers:
            x = layer(x)
        if output_rows is not None:
            x = x.index_select(0, output_rows)
        return self.output_projection(layer_norm(x, decoder.after_norm)).float()


register_fast_decoder(SANMDecoder)(FastSANMDecoder)
