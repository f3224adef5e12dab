"""Long-short range attention (LSRA): attention and convolution branches side by side.

Each branch gets its own slice of the channels (``BranchSpec.dim``); the outputs are concatenated back.
Attention models long-range context, convolution local context (arXiv:2004.11886, Sec. 3).
``MultiBranch`` takes the call signature of fairseq's ``MultiheadAttention`` so that fairseq's
transformer layers use it as their ``self_attn`` unchanged.
"""
from typing import Dict, List, Optional, Tuple, Union

import torch
from fairseq.modules import MultiheadAttention
from torch import Tensor, nn

from fairseq_accel.modules.branch_spec import BranchSpec
from fairseq_accel.modules.encoder_decoder_types import IncrementalState
from fairseq_accel.modules.lsra_convolution import CONV_BRANCHES
from fairseq_accel.modules.padding_removal import ValidFrames


class MultiBranch(nn.Module):
    """Split channels between attention and convolution branches; concatenate their outputs."""

    def __init__(
        self,
        branches: List[BranchSpec],
        causal: bool,
        attention_dropout: float = 0.0,
        glu: bool = False,
        weight_softmax: bool = True,
        weight_dropout: float = 0.0,
    ):
        super().__init__()
        self.dims = [branch.dim for branch in branches]
        self.embed_dim = sum(self.dims)
        modules = []
        for branch in branches:
            if branch.type == "attn":
                modules.append(
                    MultiheadAttention(branch.dim, branch.heads, dropout=attention_dropout, self_attention=True)
                )
            else:
                modules.append(
                    CONV_BRANCHES[branch.type](
                        branch.dim,
                        branch.kernel_size,
                        branch.heads,
                        causal=causal,
                        glu=glu,
                        weight_softmax=weight_softmax,
                        weight_dropout=weight_dropout,
                    )
                )
        self.branches = nn.ModuleList(modules)
        # fairseq's TransformerDecoderLayerBase reads these to size its optional per-head scaling.
        self.num_heads = sum(branch.heads for branch in branches)
        self.head_dim = self.embed_dim // self.num_heads

    def forward(
        self,
        query: Tensor,
        key: Optional[Tensor],
        value: Optional[Tensor],
        key_padding_mask: Optional[Union[Tensor, ValidFrames]] = None,
        incremental_state: Optional[IncrementalState] = None,
        need_weights: bool = False,
        static_kv: bool = False,
        attn_mask: Optional[Tensor] = None,
        **unused,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """Self-attention replacement: ``query`` is ``(time, batch, embed_dim)``; key/value must be it too.

        With :class:`ValidFrames` as ``key_padding_mask``, ``query`` holds a batch's valid frames packed as
        ``(frames, 1, embed_dim)`` (an encoder without padding): the branches run on the zero-padded batch and the
        output is packed again.
        """
        if key is not None and key is not query:
            raise ValueError("LSRA branches implement self-attention only (key must be the query)")
        if isinstance(key_padding_mask, ValidFrames):
            frames = key_padding_mask
            padded = frames.unpack(query.squeeze(1)).transpose(0, 1)
            out, attn_weights = self(padded, padded, padded, frames.padding, incremental_state, need_weights,
                                     static_kv, attn_mask)
            return frames.pack(out.transpose(0, 1)).unsqueeze(1), attn_weights
        outputs = []
        attn_weights = None
        for branch, chunk in zip(self.branches, query.split(self.dims, dim=-1)):
            if isinstance(branch, MultiheadAttention):
                out, attn_weights = branch(
                    query=chunk,
                    key=chunk,
                    value=chunk,
                    key_padding_mask=key_padding_mask,
                    incremental_state=incremental_state,
                    need_weights=need_weights,
                    attn_mask=attn_mask,
                )
            else:
                out = branch(chunk, key_padding_mask=key_padding_mask, incremental_state=incremental_state)
            outputs.append(out)
        return torch.cat(outputs, dim=-1), attn_weights

    def _get_input_buffer(self, incremental_state: Optional[IncrementalState]) -> Dict[str, Optional[Tensor]]:
        """fairseq's decoder layer asks its self-attention for its cache; LSRA keeps one per branch."""
        for branch in self.branches:
            if isinstance(branch, MultiheadAttention):
                return branch._get_input_buffer(incremental_state)
        return {}
