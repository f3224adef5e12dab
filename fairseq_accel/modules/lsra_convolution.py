"""Convolution branches of LSRA (Lite Transformer) layers, padding-exact and incremental-exact.

A branch is ``linear_in (-> GLU) -> mask padding -> depthwise conv over time -> linear_out`` on its share
of the channels, like the reference's ``LightweightConv``/``DynamicConv`` with ``conv_linear``
(mit-han-lab/lite-transformer ``fairseq/modules/dynamic_convolution.py``). Two reference flaws are fixed:

* The reference zeroes padded steps *before* ``linear_in``, whose bias makes them non-zero again, so
  padding leaks into the convolution. Here padded steps are zeroed right before the convolution, which
  then sees exactly the zeros it would see at the edge of an unpadded sentence.
* fairseq's dynamic convolution renormalises a kernel over the steps that exist when the kernel is longer
  than the sequence, but not in incremental decoding (fairseq issue #3908), so the two disagree. Here
  every kernel is normalised over all K taps and missing steps are zeros, in the full forward and in
  incremental decoding alike (the incremental state starts as K-1 zero steps).

Kernels are per head and shared by the ``dim/heads`` channels of the head (fairseq's convention: channel
``c`` belongs to head ``c // (dim/heads)``).
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from fairseq.incremental_decoding_utils import with_incremental_state
from torch import Tensor, nn

from fairseq_accel.modules.encoder_decoder_types import IncrementalState


def _linear(in_features: int, out_features: int, bias: bool = True) -> nn.Linear:
    layer = nn.Linear(in_features, out_features, bias=bias)
    nn.init.xavier_uniform_(layer.weight)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


def conv_padding(kernel_size: int, causal: bool) -> Tuple[int, int]:
    """(left, right) zero padding: centred for the encoder (K//2 left), K-1 left for a causal decoder."""
    if causal:
        return kernel_size - 1, 0
    left = kernel_size // 2 if kernel_size % 2 else (kernel_size - 1) // 2
    return left, kernel_size - 1 - left


@with_incremental_state
class ConvBranch(nn.Module):
    """Shared body of the convolution branches; subclasses define how the kernel weights are made.

    Input and output are ``(time, batch, dim)``; ``key_padding_mask`` is ``(batch, time)``, True at padding.
    """

    def __init__(
        self,
        dim: int,
        kernel_size: int,
        num_heads: int,
        causal: bool,
        glu: bool = False,
        weight_softmax: bool = True,
        weight_dropout: float = 0.0,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"convolution branch dim {dim} is not divisible by its {num_heads} heads")
        self.dim = dim
        self.kernel_size = kernel_size
        self.num_heads = num_heads
        self.causal = causal
        self.padding = conv_padding(kernel_size, causal)
        self.weight_softmax = weight_softmax
        self.weight_dropout = weight_dropout
        self.linear_in = _linear(dim, 2 * dim if glu else dim)
        self.glu = glu
        self.linear_out = _linear(dim, dim)

    def forward(
        self,
        x: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        incremental_state: Optional[IncrementalState] = None,
    ) -> Tensor:
        x = self.linear_in(x)
        if self.glu:
            x = F.glu(x, dim=-1)
        if key_padding_mask is not None:
            x = x.masked_fill(key_padding_mask.transpose(0, 1).unsqueeze(-1), 0.0)
        padded = self._extend_with_context(x, incremental_state)
        return self.linear_out(self.convolve(padded, x))

    def _extend_with_context(self, x: Tensor, incremental_state: Optional[IncrementalState]) -> Tensor:
        """Prepend/append what the kernel sees outside ``x``: zeros, or the cached previous steps."""
        if incremental_state is None:
            left, right = self.padding
            return F.pad(x, (0, 0, 0, 0, left, right))
        if not self.causal:
            raise RuntimeError("incremental decoding needs a causal (decoder) convolution branch")
        history = self.get_incremental_state(incremental_state, "history")
        if history is None:
            history = x.new_zeros(self.kernel_size - 1, x.size(1), x.size(2))
        padded = torch.cat([history, x], dim=0)
        self.set_incremental_state(incremental_state, "history", padded[padded.size(0) - (self.kernel_size - 1):])
        return padded

    def normalize(self, weight: Tensor) -> Tensor:
        """Softmax over the K taps (paper's ``weight_softmax``) and DropConnect during training."""
        if self.weight_softmax:
            weight = torch.softmax(weight, dim=-1)
        return F.dropout(weight, self.weight_dropout, training=self.training)

    def convolve(self, padded: Tensor, x: Tensor) -> Tensor:
        """Valid convolution of ``padded`` (time + K - 1 steps) giving one output per step of ``x``."""
        raise NotImplementedError

    def reorder_incremental_state(self, incremental_state: IncrementalState, new_order: Tensor) -> None:
        history = self.get_incremental_state(incremental_state, "history")
        if history is not None:
            self.set_incremental_state(incremental_state, "history", history.index_select(1, new_order))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, kernel_size={self.kernel_size}, heads={self.num_heads}, causal={self.causal}, "
            f"glu={self.glu}, weight_softmax={self.weight_softmax}, weight_dropout={self.weight_dropout}"
        )


class LightweightConvBranch(ConvBranch):
    """Lightweight convolution (Wu et al., 2019): one learned, softmax-normalised kernel per head."""

    def __init__(self, dim: int, kernel_size: int, num_heads: int, causal: bool, **kwargs):
        super().__init__(dim, kernel_size, num_heads, causal, **kwargs)
        self.weight = nn.Parameter(torch.empty(num_heads, 1, kernel_size))
        nn.init.xavier_uniform_(self.weight)

    def convolve(self, padded: Tensor, x: Tensor) -> Tensor:
        time, batch, dim = padded.shape
        weight = self.normalize(self.weight).repeat_interleave(dim // self.num_heads, dim=0)  # dim x 1 x K
        out = F.conv1d(padded.permute(1, 2, 0), weight, groups=dim)  # batch x dim x time
        return out.permute(2, 0, 1)


class DynamicConvBranch(ConvBranch):
    """Dynamic convolution (Wu et al., 2019): each step predicts its own kernel per head from its input."""

    def __init__(self, dim: int, kernel_size: int, num_heads: int, causal: bool, **kwargs):
        super().__init__(dim, kernel_size, num_heads, causal, **kwargs)
        self.weight_linear = _linear(dim, num_heads * kernel_size, bias=False)

    def convolve(self, padded: Tensor, x: Tensor) -> Tensor:
        time, batch, dim = x.shape
        heads, kernel = self.num_heads, self.kernel_size
        weight = self.normalize(self.weight_linear(x).view(time, batch, heads, kernel))
        windows = padded.unfold(0, kernel, 1).reshape(time, batch, heads, dim // heads, kernel)
        out = torch.einsum("tbhrk,tbhk->tbhr", windows, weight)
        return out.reshape(time, batch, dim)


CONV_BRANCHES = {"lightweight": LightweightConvBranch, "dynamic": DynamicConvBranch}
