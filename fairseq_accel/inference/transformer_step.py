"""Fast step of fairseq's transformer decoder (``transformer``, ``s2t_transformer``, the transformer decoder
of ``s2t_sanm``) and of the LSRA decoder of ``lite_transformer``.

The step reads the fairseq modules' weights (nothing is converted or copied, except that the query, key
and value projections of self-attention are concatenated once into one matmul with the query scaling
folded in) and runs one token per hypothesis through the same computation as
``TransformerDecoderLayerBase.forward`` in incremental mode.

The int8 attention path (arXiv 2104.05784): when the model runs int8 layers with calibrated output ranges
(a compressed checkpoint, ``Int8Linear.forward_levels``) and the cache is int8, the query/key/value
projections return int8 levels, keys and values go into the caches as they are, and Q.K^T, softmax and .V
run in float32 on them (the caches fold each channel's fixed step into the query and the output). On the C++
kernels the rounding to levels, the cache writes and the attention are one call (``level_cache_attention_step``),
which the C++ decoder step runs too.
"""
from types import ModuleType
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from fairseq.models.speech_to_text.s2t_transformer import TransformerDecoderScriptable
from fairseq.models.transformer import TransformerDecoder, TransformerDecoderBase
from fairseq.modules import MultiheadAttention
from torch import Tensor, nn

from fairseq_accel.inference.int8_execution import (
    fused_linear_step,
    linear_step,
    log_int8_attention,
    output_level_steps,
)
from fairseq_accel.inference.beam_cache import AttentionKVCache, BeamState, CrossAttentionMemory, WindowCache
from fairseq_accel.inference.cpu_kernels import (
    NativeStepUnsupported,
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
    FastDecodingUnsupported,
    layer_norm,
    register_fast_decoder,
)
from fairseq_accel.inference.position_table import PositionTable
from fairseq_accel.models.lite_transformer import LiteTransformerDecoder
from fairseq_accel.modules.int8_linear import Int8Linear
from fairseq_accel.modules.lsra_convolution import ConvBranch, DynamicConvBranch, LightweightConvBranch
from fairseq_accel.modules.multibranch import MultiBranch


def _check_plain_attention(attention: MultiheadAttention, where: str) -> None:
    if attention.bias_k is not None or attention.add_zero_attn:
        raise FastDecodingUnsupported(f"{where} uses add_bias_kv/add_zero_attn")


def key_channel_balance(k_proj: nn.Linear) -> Tensor:
    """Per-channel divisors that even out the key channels' ranges before per-token int8 scales (the
    SmoothQuant idea, Xiao et al. 2023, applied to keys): ``|k_c| <~ ||W_c|| + |b_c|`` for layer-normed
    inputs. Dividing key channel ``c`` and multiplying query channel ``c`` by it leaves every q.k unchanged."""
    balance = k_proj.weight.norm(dim=1)
    if k_proj.bias is not None:
        balance = balance + k_proj.bias.abs()
    return balance / balance.mean()


class SelfAttentionStep:
    """fairseq ``MultiheadAttention`` as decoder self-attention, over an ``AttentionKVCache``."""

    def __init__(self, attention: MultiheadAttention, options: FastDecodingOptions):
        _check_plain_attention(attention, "decoder self-attention")
        self.heads, self.head_dim = attention.num_heads, attention.head_dim
        projections = (attention.q_proj, attention.k_proj, attention.v_proj)
        if any(p.bias is None for p in projections) and any(p.bias is not None for p in projections):
            raise FastDecodingUnsupported("decoder self-attention has biases on some projections only")
        q_weight = attention.q_proj.weight.detach()
        q_scale = q_weight.new_full((q_weight.size(0),), attention.scaling)
        k_scale = torch.ones_like(q_scale)
        if options.key_scale == "channel" and options.kv_cache_dtype == "int8":
            balance = key_channel_balance(attention.k_proj)
            q_scale, k_scale = q_scale * balance, 1.0 / balance
        try:
            self.qkv = fused_linear_step(projections, (q_scale, k_scale, torch.ones_like(q_scale)))
        except ValueError as reason:  # int8 projections that quantize their input differently (Int8Linear.fuse)
            raise FastDecodingUnsupported(f"decoder self-attention: {reason}") from None
        self.out = linear_step(attention.out_proj)
        self.cache: Optional[AttentionKVCache] = None
        # the int8 attention path: one level's value per channel of the query, key and value [3, H, D]
        steps = output_level_steps(self.qkv, self.heads, self.head_dim)
        self.level_steps = steps if options.kv_cache_dtype == "int8" else None
        self.level_factors = None if self.level_steps is None else self.qkv.output_level_factors().view_as(steps)
        self.int8_cache = options.kv_cache_dtype == "int8"

    @property
    def int8_levels(self) -> bool:
        return self.level_steps is not None

    def start(self, state: BeamState, options: FastDecodingOptions, dtype: torch.dtype, device: torch.device) -> None:
        self.cache = state.add(AttentionKVCache(
            state.indirection, self.heads, self.head_dim, options.kv_cache_dtype, dtype, device, state.kernels,
            level_steps=None if self.level_steps is None else (self.level_steps[1], self.level_steps[2]),
            cpu_kernels=state.cpu_kernels,
        ))

    def __call__(self, x: Tensor) -> Tensor:
        rows = x.size(0)
        if self.level_steps is not None and self.cache.cpu_kernels is not None:
            q, k, v = self.qkv(x).view(rows, 3, self.heads, self.head_dim).unbind(1)
            attended = self.cache.level_step(q, k, v, self.level_factors, self.level_steps)
            return self.out(attended.reshape(rows, self.heads * self.head_dim))
        if self.level_steps is not None:
            q, k, v = self.qkv.forward_levels(x).view(rows, 3, self.heads, self.head_dim).unbind(1)
            q = q.to(x.dtype) * self.level_steps[0]
        else:
            q, k, v = self.qkv(x).view(rows, 3, self.heads, self.head_dim).unbind(1)
        return self.out(self.cache.step(q, k, v).reshape(rows, self.heads * self.head_dim))

    def native(self):
        """The C++ step's branch (float32, per-token int8 or levels cache); takes the cache's keys and values (and
        scales)."""
        return native_kernels().AttentionBranch(native_linear(self.qkv), native_linear(self.out), self.heads,
                                                self.head_dim, self.int8_cache, self.level_factors, self.level_steps)


class ConvBranchStep:
    """An LSRA convolution branch (lightweight or dynamic) over a ``WindowCache`` of its inputs."""

    def __init__(self, branch: ConvBranch):
        if not branch.causal:
            raise FastDecodingUnsupported("a decoder convolution branch is not causal")
        self.branch = branch
        self.heads = branch.num_heads
        self.linear_in, self.linear_out = linear_step(branch.linear_in), linear_step(branch.linear_out)
        self.window: Optional[WindowCache] = None
        if isinstance(branch, LightweightConvBranch):
            weight = branch.weight.squeeze(1)  # heads x K
            weight = torch.softmax(weight, dim=-1) if branch.weight_softmax else weight
            # K x dim: tap k of channel c is its head's weight (a head spans dim/heads channels)
            self.static_weight = weight.t().repeat_interleave(branch.dim // self.heads, dim=1)
        elif isinstance(branch, DynamicConvBranch):
            self.static_weight = None
            self.weight_linear = linear_step(branch.weight_linear)
        else:
            raise FastDecodingUnsupported(f"convolution branch {type(branch).__name__} has no fast step")

    def start(self, state: BeamState, options: FastDecodingOptions, dtype: torch.dtype, device: torch.device) -> None:
        self.window = state.add(WindowCache(state.indirection, self.branch.kernel_size, self.branch.dim, dtype, device,
                                            state.cpu_kernels))

    def __call__(self, x: Tensor) -> Tensor:
        branch = self.branch
        x = self.linear_in(x)
        if branch.glu:
            x = F.glu(x, dim=-1)
        weight = self.static_weight
        if weight is None:
            weight = self.weight_linear(x).view(x.size(0), self.heads, branch.kernel_size)
            if branch.weight_softmax:
                weight = torch.softmax(weight, dim=-1)
        return self.linear_out(self.window.convolve(x, weight))

    def native(self):
        """The C++ step's branch; takes the window buffer."""
        branch, kernels = self.branch, native_kernels()
        static = None if self.static_weight is None else self.static_weight.detach()
        weight_linear = None if self.static_weight is not None else native_linear(self.weight_linear)
        return kernels.ConvolutionBranch(native_linear(self.linear_in), bool(branch.glu), static, weight_linear,
                                         self.heads, branch.kernel_size, bool(branch.weight_softmax),
                                         native_linear(self.linear_out))


class MultiBranchStep:
    """LSRA self-attention: each branch on its slice of the channels, outputs concatenated."""

    def __init__(self, multibranch: MultiBranch, options: FastDecodingOptions):
        self.dims = multibranch.dims
        self.branches = [
            SelfAttentionStep(b, options) if isinstance(b, MultiheadAttention) else ConvBranchStep(b)
            for b in multibranch.branches
        ]

    def start(self, state: BeamState, options: FastDecodingOptions, dtype: torch.dtype, device: torch.device) -> None:
        for branch in self.branches:
            branch.start(state, options, dtype, device)

    def __call__(self, x: Tensor) -> Tensor:
        return torch.cat([branch(chunk) for branch, chunk in zip(self.branches, x.split(self.dims, dim=-1))], dim=-1)

    def native(self):
        return [branch.native() for branch in self.branches], list(self.dims)


class CrossAttentionStep:
    """fairseq ``MultiheadAttention`` over the encoder output: K/V once per sentence, shared by its beams."""

    def __init__(self, attention: MultiheadAttention, options: FastDecodingOptions):
        _check_plain_attention(attention, "decoder cross-attention")
        self.attention = attention
        self.heads, self.head_dim = attention.num_heads, attention.head_dim
        q_proj = attention.q_proj
        q_weight = q_proj.weight.detach()
        self.q = fused_linear_step([q_proj], [q_weight.new_full((q_weight.size(0),), attention.scaling)])
        self.out = linear_step(attention.out_proj)
        self.memory: Optional[CrossAttentionMemory] = None
        steps = [output_level_steps(p, self.heads, self.head_dim) for p in (attention.k_proj, attention.v_proj)]
        # the int8 attention path: one level's value per key and value channel, [H, D] each
        self.level_steps = (None if None in steps or options.cross_kv_dtype != "int8"
                            else (steps[0][0], steps[1][0]))

    @property
    def int8_levels(self) -> bool:
        return self.level_steps is not None

    def start(self, state: BeamState, options: FastDecodingOptions, encoder_out: Tensor, padding_mask: Optional[Tensor],
              keys_values: Optional[Tuple[Tensor, Tensor]] = None) -> None:
        """``encoder_out``: ``[S, B, C]`` (fairseq's layout); ``padding_mask``: ``[B, S]``; ``keys_values``: the
        projections of ``encoder_out`` as ``[B, H, S, D]`` where they are made already (:class:`MemoryProjections`)."""
        source_len, batch, _ = encoder_out.shape
        attention = self.attention

        def heads(projection: nn.Module) -> Tensor:
            x = projection.forward_levels(encoder_out) if self.int8_levels else projection(encoder_out)
            return x.view(source_len, batch, self.heads, self.head_dim).permute(1, 2, 0, 3).contiguous()

        keys, values = keys_values or (heads(attention.k_proj), heads(attention.v_proj))
        self.memory = state.add(
            CrossAttentionMemory(keys, values, padding_mask, state.beam, options.cross_kv_dtype, options.key_scale,
                                 self.level_steps, state.cpu_kernels)
        )

    def __call__(self, x: Tensor) -> Tensor:
        rows = x.size(0)
        q = self.q(x).view(rows, self.heads, self.head_dim)
        return self.out(self.memory.attend(q).reshape(rows, self.heads * self.head_dim))

    def native(self):
        return native_cross_attention(self.q, self.out, self.heads, self.head_dim, self.level_steps)


class TransformerLayerStep:
    """``TransformerDecoderLayerBase`` (pre- or post-norm) for one token per hypothesis."""

    def __init__(self, layer: nn.Module, options: FastDecodingOptions):
        for extra in ("c_attn", "attn_ln", "ffn_layernorm", "w_resid"):
            if getattr(layer, extra, None) is not None:
                raise FastDecodingUnsupported(f"decoder layers use {extra} (NormFormer options)")
        if layer.cross_self_attention:
            raise FastDecodingUnsupported("decoder layers use --cross-self-attention")
        self.pre_norm = layer.normalize_before
        if isinstance(layer.self_attn, MultiBranch):
            self.self_attn = MultiBranchStep(layer.self_attn, options)
        elif isinstance(layer.self_attn, MultiheadAttention):
            self.self_attn = SelfAttentionStep(layer.self_attn, options)
        else:
            raise FastDecodingUnsupported(f"decoder self-attention {type(layer.self_attn).__name__} has no fast step")
        self.cross_attn = None if layer.encoder_attn is None else CrossAttentionStep(layer.encoder_attn, options)
        self.activation: Callable[[Tensor], Tensor] = layer.activation_fn
        self.self_attn_norm, self.final_norm = layer.self_attn_layer_norm, layer.final_layer_norm
        self.cross_attn_norm = layer.encoder_attn_layer_norm
        self.fc1, self.fc2 = linear_step(layer.fc1), linear_step(layer.fc2)

    def attention_steps(self) -> List:
        """The layer's self- and cross-attention steps (an LSRA layer's attention branch included)."""
        self_attn = self.self_attn.branches if isinstance(self.self_attn, MultiBranchStep) else [self.self_attn]
        steps = [step for step in self_attn if isinstance(step, SelfAttentionStep)]
        return steps + ([self.cross_attn] if self.cross_attn is not None else [])

    def start(self, state, options, encoder_out, padding_mask, dtype, device,
              memory_keys_values: Optional[Tuple[Tensor, Tensor]] = None) -> None:
        self.self_attn.start(state, options, dtype, device)
        if self.cross_attn is not None:
            self.cross_attn.start(state, options, encoder_out, padding_mask, memory_keys_values)

    def _block(self, x: Tensor, norm: nn.Module, body: Callable[[Tensor], Tensor]) -> Tensor:
        """Residual block: ``x + body(norm(x))`` (pre-norm) or ``norm(x + body(x))`` (post-norm)."""
        if self.pre_norm:
            return x + body(layer_norm(x, norm))
        return layer_norm(x + body(x), norm)

    def _feed_forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.activation(self.fc1(x)))

    def __call__(self, x: Tensor) -> Tensor:
        x = self._block(x, self.self_attn_norm, self.self_attn)
        if self.cross_attn is not None:
            x = self._block(x, self.cross_attn_norm, self.cross_attn)
        return self._block(x, self.final_norm, self._feed_forward)

    def native(self):
        """This layer as the C++ step's ``TransformerLayer``."""
        kernels = native_kernels()
        if isinstance(self.self_attn, MultiBranchStep):
            branches, widths = self.self_attn.native()
        else:
            branches, widths = [self.self_attn.native()], [self.self_attn_norm.normalized_shape[0]]
        cross = None if self.cross_attn is None else self.cross_attn.native()
        cross_norm = None if self.cross_attn is None else native_norm(self.cross_attn_norm)
        feed_forward = kernels.FeedForward(native_linear(self.fc1), native_activation(self.activation), None,
                                           native_linear(self.fc2))
        return kernels.TransformerLayer(self.pre_norm, native_norm(self.self_attn_norm), branches, widths, cross,
                                        cross_norm, native_norm(self.final_norm), feed_forward)


class FastTransformerDecoder(FastDecoder):
    """``TransformerDecoderBase.extract_features`` + ``output_layer`` for one token per hypothesis."""

    def __init__(self, decoder: TransformerDecoderBase, options: FastDecodingOptions, kernels: Optional[ModuleType] = None):
        if decoder.adaptive_softmax is not None:
            raise FastDecodingUnsupported("the decoder uses an adaptive softmax")
        if decoder.quant_noise is not None:
            raise FastDecodingUnsupported("the decoder uses quant-noise")
        self.decoder = decoder
        self.options = options
        self.layers = [TransformerLayerStep(layer, options) for layer in decoder.layers]
        log_int8_attention(sum(step.int8_levels for layer in self.layers for step in layer.attention_steps()))
        self.output_projection = linear_step(decoder.output_projection)  # W^T stored once: the largest GEMM
        self.kernels = kernels  # for the int8 self-attention cache
        self.position_table = (None if decoder.embed_positions is None
                               else PositionTable(decoder.embed_positions, decoder.dictionary.eos()))
        self.memory_projections = None  # MemoryProjections: None until built, False where the model has none

    def start(self, encoder_out: Dict[str, List[Tensor]], beam: int, max_steps: int) -> None:
        memory = encoder_out["encoder_out"][0]
        padding = encoder_out["encoder_padding_mask"][0] if encoder_out.get("encoder_padding_mask") else None
        weight = self.decoder.embed_tokens.weight
        self.state = BeamState(memory.size(1), beam, max_steps, weight.device, self.kernels,
                               resolve_cpu_kernels(self.options.kernel_choice, weight.device))
        # positions of steps 0..max_steps-1, made once for the longest batch so far, not for every batch
        self.positions = None if self.position_table is None else self.position_table.first(max_steps, weight.device)
        projected = self._project_memory(memory)
        for i, layer in enumerate(self.layers):
            keys_values = None if projected is None else (projected[2 * i], projected[2 * i + 1])
            layer.start(self.state, self.options, memory, padding, weight.dtype, weight.device, keys_values)
        self.bind_native_step()

    def _project_memory(self, memory: Tensor) -> Optional[List[Tensor]]:
        """Every layer's cross-attention keys and values of ``memory`` (``[k0, v0, k1, v1, ...]``) in one C++ call
        where the C++ kernels are in use and they are all int8 layers with float32 outputs; else None (each layer
        projects its own in Python). Float32 layers stay with ``nn.Linear``: their output must be stock's."""
        if self.memory_projections is None:
            self.memory_projections = self._build_memory_projections()
        if self.memory_projections is False or self.state.cpu_kernels is None or memory.dtype != torch.float32:
            return None
        return self.memory_projections(memory)

    def _build_memory_projections(self):
        steps = [layer.cross_attn for layer in self.layers]
        if not steps or any(step is None or step.int8_levels for step in steps):
            return False
        projections = [p for step in steps for p in (step.attention.k_proj, step.attention.v_proj)]
        if not all(isinstance(p, Int8Linear) and p.native_weights() is not None for p in projections):
            return False
        if len({(step.heads, step.head_dim) for step in steps}) != 1:
            return False
        return native_kernels().MemoryProjections([native_linear(p) for p in projections], steps[0].heads,
                                                  steps[0].head_dim)

    def build_native_step(self):
        decoder = self.decoder
        if decoder.project_in_dim is not None or decoder.project_out_dim is not None:
            raise NativeStepUnsupported("the decoder projects its input or output dimension")
        optional_norm = lambda norm: None if norm is None else native_norm(norm)
        return native_kernels().DecoderStep(
            decoder.embed_tokens.weight.detach(), float(decoder.embed_scale), optional_norm(decoder.layernorm_embedding),
            [layer.native() for layer in self.layers], optional_norm(decoder.layer_norm),
            native_linear(self.output_projection),
        )

    def step(self, tokens: Tensor, output_rows: Optional[Tensor] = None) -> Tensor:
        if self.native_caches is not None:
            return self.native_logits(tokens, output_rows)
        decoder = self.decoder
        x = decoder.embed_scale * F.embedding(tokens, decoder.embed_tokens.weight)
        if decoder.project_in_dim is not None:
            x = decoder.project_in_dim(x)
        if self.positions is not None:
            x = x + self.positions[self.state.indirection.step]
        if decoder.layernorm_embedding is not None:
            x = layer_norm(x, decoder.layernorm_embedding)
        for layer in self.layers:
            x = layer(x)
        if decoder.layer_norm is not None:
            x = layer_norm(x, decoder.layer_norm)
        if output_rows is not None:
            x = x.index_select(0, output_rows)
        if decoder.project_out_dim is not None:
            x = decoder.project_out_dim(x)
        return self.output_projection(x).float()


for _decoder_class in (TransformerDecoderBase, TransformerDecoder, TransformerDecoderScriptable, LiteTransformerDecoder):
    register_fast_decoder(_decoder_class)(FastTransformerDecoder)
