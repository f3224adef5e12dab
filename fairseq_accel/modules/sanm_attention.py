"""SAN-M: self-attention with a DFSMN memory block (Gao et al. 2020, arXiv:2006.01713), FunASR's semantics.

Parameter names follow FunASR (``funasr/models/sanm/attention.py``: ``linear_q_k_v``, ``fsmn_block``,
``linear_out``, ``linear_q``, ``linear_k_v``; ``sanm_shfit`` spelled as there) so trained weights map 1:1.
Tensors are batch-first ``(batch, time, dim)``; ``padding_mask`` is ``(batch, time)``, True at padding.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from fairseq import utils
from fairseq.incremental_decoding_utils import with_incremental_state
from torch import Tensor, nn

from fairseq_accel.modules.encoder_decoder_types import IncrementalState
from fairseq_accel.modules.padding_removal import ValidFrames


def fsmn_padding(kernel_size: int, shift: int) -> Tuple[int, int]:
    """FunASR's (left, right) padding of the FSMN convolution: (K-1)//2 + shift on the left."""
    left = (kernel_size - 1) // 2 + shift
    right = kernel_size - 1 - left
    if right < 0:
        raise ValueError(f"--sanm-shift {shift} is too large for FSMN kernel size {kernel_size} (at most {kernel_size // 2})")
    return left, right


def _keep(padding_mask: Optional[Tensor], x: Tensor) -> Tensor:
    """(batch, time, 1) multiplier: 1 at valid frames, 0 at padding."""
    if padding_mask is None:
        return x.new_ones(x.size(0), x.size(1), 1)
    return (~padding_mask).unsqueeze(-1).to(x.dtype)


class MultiHeadedAttentionSANM(nn.Module):
    """Encoder self-attention + FSMN memory: ``linear_out(softmax(QKᵀ/√d)V) + FSMN(V)``.

    One fused projection makes Q, K and V (``in_feat`` may differ from ``n_feat`` in a first layer that
    changes the width); the FSMN is a depthwise convolution over the whole V before the head split,
    with a residual, masked before and after (FunASR ``forward_fsmn``).
    """

    def __init__(self, n_head: int, in_feat: int, n_feat: int, dropout_rate: float, kernel_size: int, sanm_shfit: int = 0):
        super().__init__()
        if n_feat % n_head:
            raise ValueError(f"SAN-M attention dim {n_feat} is not divisible by {n_head} heads")
        self.h, self.d_k = n_head, n_feat // n_head
        self.linear_q_k_v = nn.Linear(in_feat, 3 * n_feat)
        self.linear_out = nn.Linear(n_feat, n_feat)
        self.fsmn_block = nn.Conv1d(n_feat, n_feat, kernel_size, groups=n_feat, bias=False)
        self.padding = fsmn_padding(kernel_size, sanm_shfit)
        self.dropout = nn.Dropout(dropout_rate)

    def fsmn_memory(self, v: Tensor) -> Tensor:
        """FSMN output before dropout and masking: the window over ``v`` (zero at padding) plus ``v``."""
        return self.fsmn_block(F.pad(v.transpose(1, 2), self.padding)).transpose(1, 2) + v

    def forward_fsmn(self, v: Tensor, padding_mask: Optional[Tensor]) -> Tensor:
        keep = _keep(padding_mask, v)
        return self.dropout(self.fsmn_memory(v * keep)) * keep

    def attend(self, q: Tensor, k: Tensor, v: Tensor, padding_mask: Optional[Tensor]) -> Tensor:
        """softmax(QKᵀ/√d)V over the heads of batch-first (batch, time, n_feat) ``q``, ``k``, ``v``."""
        batch, time, _ = q.shape
        heads = [t.view(batch, time, self.h, self.d_k).transpose(1, 2) for t in (q, k, v)]
        attend = None if padding_mask is None else ~padding_mask[:, None, None, :]
        context = F.scaled_dot_product_attention(
            *heads, attn_mask=attend, dropout_p=self.dropout.p if self.training else 0.0
        )
        return context.transpose(1, 2).reshape(batch, time, self.h * self.d_k)

    def forward(self, x: Tensor, padding_mask: Optional[Tensor]) -> Tensor:
        q, k, v = self.linear_q_k_v(x).chunk(3, dim=-1)
        return self.linear_out(self.attend(q, k, v, padding_mask)) + self.forward_fsmn(v, padding_mask)

    def forward_packed(self, x: Tensor, frames: ValidFrames) -> Tensor:
        """:meth:`forward` on packed valid frames ``(frames, in_feat)`` -> ``(frames, n_feat)``: the projections
        see valid frames only; attention and the FSMN window run on the zero-padded batch."""
        q, k, v = frames.unpack(self.linear_q_k_v(x)).chunk(3, dim=-1)
        context = frames.pack(self.attend(q, k, v, frames.padding))
        return self.linear_out(context) + frames.pack(self.dropout(self.fsmn_memory(v)))


@with_incremental_state
class CausalFSMN(nn.Module):
    """Decoder FSMN memory (FunASR ``MultiHeadedAttentionSANMDecoder``), made causal.

    Left padding K-1, none on the right: step t sees steps t-K+1..t only (FunASR's template with
    ``sanm_shfit: 0`` centres the kernel and lets training see future tokens). Incremental decoding
    keeps the last K-1 inputs, starting from zeros, so it equals the full forward.
    """

    def __init__(self, n_feat: int, dropout_rate: float, kernel_size: int):
        super().__init__()
        self.fsmn_block = nn.Conv1d(n_feat, n_feat, kernel_size, groups=n_feat, bias=False)
        self.kernel_size = kernel_size
        self.dropout = nn.Dropout(dropout_rate)

    def forward(self, x: Tensor, padding_mask: Optional[Tensor], incremental_state: Optional[IncrementalState] = None) -> Tensor:
        keep = _keep(padding_mask, x)
        x = x * keep
        context = self.kernel_size - 1
        if incremental_state is None:
            padded = F.pad(x, (0, 0, context, 0))
        else:
            history = self.get_incremental_state(incremental_state, "history")
            if history is None:
                history = x.new_zeros(x.size(0), context, x.size(2))
            padded = torch.cat([history, x], dim=1)
            self.set_incremental_state(incremental_state, "history", padded[:, padded.size(1) - context:])
        memory = self.fsmn_block(padded.transpose(1, 2)).transpose(1, 2)
        return self.dropout(memory + x) * keep

    def reorder_incremental_state(self, incremental_state: IncrementalState, new_order: Tensor) -> None:
        history = self.get_incremental_state(incremental_state, "history")
        if history is not None:
            self.set_incremental_state(incremental_state, "history", history.index_select(0, new_order))


@with_incremental_state
class MultiHeadedCrossAttention(nn.Module):
    """Decoder-encoder attention (FunASR ``MultiHeadedAttentionCrossAtt``): fused K/V projection of the
    encoder output, computed once per sentence during incremental decoding."""

    def __init__(self, n_head: int, n_feat: int, dropout_rate: float, encoder_output_size: int):
        super().__init__()
        if n_feat % n_head:
            raise ValueError(f"cross-attention dim {n_feat} is not divisible by {n_head} heads")
        self.h, self.d_k = n_head, n_feat // n_head
        self.linear_q = nn.Linear(n_feat, n_feat)
        self.linear_k_v = nn.Linear(encoder_output_size, 2 * n_feat)
        self.linear_out = nn.Linear(n_feat, n_feat)
        self.dropout = nn.Dropout(dropout_rate)

    def _keys_values(self, memory: Tensor) -> Tuple[Tensor, Tensor]:
        batch, time, _ = memory.shape
        k, v = self.linear_k_v(memory).chunk(2, dim=-1)
        return tuple(t.view(batch, time, self.h, self.d_k).transpose(1, 2) for t in (k, v))

    def forward(
        self,
        x: Tensor,
        memory: Tensor,
        memory_padding_mask: Optional[Tensor],
        incremental_state: Optional[IncrementalState] = None,
    ) -> Tensor:
        if incremental_state is None:
            k, v = self._keys_values(memory)
        else:
            cached = self.get_incremental_state(incremental_state, "keys_values")
            if cached is None:
                k, v = self._keys_values(memory)
                self.set_incremental_state(incremental_state, "keys_values", {"k": k, "v": v})
            else:
                k, v = cached["k"], cached["v"]
        batch, time, _ = x.shape
        q = self.linear_q(x).view(batch, time, self.h, self.d_k).transpose(1, 2)
        attend = None if memory_padding_mask is None else ~memory_padding_mask[:, None, None, :]
        context = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attend, dropout_p=self.dropout.p if self.training else 0.0
        )
        return self.linear_out(context.transpose(1, 2).reshape(batch, time, self.h * self.d_k))

    def reorder_incremental_state(self, incremental_state: IncrementalState, new_order: Tensor) -> None:
        cached = self.get_incremental_state(incremental_state, "keys_values")
        if cached is not None:
            reordered = {name: tensor.index_select(0, new_order) for name, tensor in cached.items()}
            self.set_incremental_state(incremental_state, "keys_values", reordered)


class PositionwiseFeedForward(nn.Module):
    """Encoder FFN (FunASR ``PositionwiseFeedForward``): ``w_2(dropout(act(w_1 x)))``, ``act`` one of
    fairseq's ``--activation-fn`` (FunASR: relu)."""

    def __init__(self, dim: int, hidden: int, dropout_rate: float, activation: str = "relu"):
        super().__init__()
        self.w_1 = nn.Linear(dim, hidden)
        self.w_2 = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout_rate)
        self.activation_fn = utils.get_activation_fn(activation)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_2(self.dropout(self.activation_fn(self.w_1(x))))


class DecoderFeedForward(nn.Module):
    """Decoder FFN (FunASR ``PositionwiseFeedForwardDecoderSANM``): ``w_2(norm(dropout(act(w_1 x))))``,
    ``w_2`` without bias, ``act`` one of fairseq's ``--activation-fn`` (FunASR: relu)."""

    def __init__(self, dim: int, hidden: int, dropout_rate: float, activation: str = "relu"):
        super().__init__()
        self.w_1 = nn.Linear(dim, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.w_2 = nn.Linear(hidden, dim, bias=False)
        self.dropout = nn.Dropout(dropout_rate)
        self.activation_fn = utils.get_activation_fn(activation)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_2(self.norm(self.dropout(self.activation_fn(self.w_1(x)))))
