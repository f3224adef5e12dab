"""What one self-attention layer of a model computed in a forward pass, for distillation losses.

:class:`LayerTap` finds the self-attention of one encoder or decoder layer, records the inputs it is
called with during ``model(**net_input)`` (forward pre-hooks, removed after the pass), and turns them
into an :class:`AttentionView` (per-head Q, K, V and the mask the layer applied) and, for an LSRA layer,
:class:`ConvView`\\s (each convolution branch's normalised kernel, a local attention distribution).

Q, K and V are recomputed from the recorded input with the layer's own projections: fairseq's
``MultiheadAttention`` takes ``F.multi_head_attention_forward`` in training and SAN-M uses
``scaled_dot_product_attention``, so neither returns per-head probabilities, but the recorded input is the
tensor of the pass itself, so losses on the view train the layer and everything below it.

Supported: fairseq ``MultiheadAttention`` (transformer, s2t_transformer), the attention branch of LSRA's
``MultiBranch`` (lite_transformer, s2t_lite_transformer) and SAN-M's ``MultiHeadedAttentionSANM``
(s2t_sanm encoder). A SAN-M decoder layer has no self-attention: its ``self_attn`` is a causal FSMN
memory (a convolution, no distribution over positions), or None in the last layer.
"""
import contextlib
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from fairseq.modules import MultiheadAttention
from torch import Tensor, nn

from fairseq_accel.modules.lsra_convolution import ConvBranch, DynamicConvBranch, LightweightConvBranch
from fairseq_accel.modules.multibranch import MultiBranch
from fairseq_accel.modules.sanm_attention import MultiHeadedAttentionSANM

SIDES = ("encoder", "decoder")


class DistillationSetupError(ValueError):
    """A distillation option does not fit the teacher or the student; the message says which and why."""


class AttentionView(NamedTuple):
    """One self-attention layer's heads. ``q``, ``k``, ``v``: (batch, heads, time, head_dim), unscaled;
    ``allowed``: (batch, 1, time, time), True where query t may attend to key s (not padding, not future in
    a decoder); ``valid``: (batch, time), True at real (non-padding) positions."""

    q: Tensor
    k: Tensor
    v: Tensor
    allowed: Tensor
    valid: Tensor


class ConvView(NamedTuple):
    """One LSRA convolution branch as a local attention: ``kernel`` (batch or 1, heads, time or 1, K) sums to
    1 over its K taps; tap j of output t reads input ``t - left + j`` (zeros outside the sentence)."""

    kernel: Tensor
    left: int


# --------------------------------------------------------------------------------------------
# Views from recorded inputs.
# --------------------------------------------------------------------------------------------
def _heads(x: Tensor, heads: int) -> Tensor:
    """(batch, time, dim) -> (batch, heads, time, dim / heads)."""
    batch, time, dim = x.shape
    return x.view(batch, time, heads, dim // heads).transpose(1, 2)


def _allowed(padding: Optional[Tensor], batch: int, time: int, device: torch.device) -> Tensor:
    """(batch, 1, time, time) keys a query may see given a (batch, time) padding mask (True at padding)."""
    if padding is None:
        return torch.ones(batch, 1, time, time, dtype=torch.bool, device=device)
    return (~padding.bool())[:, None, None, :].expand(batch, 1, time, time)


def _valid(padding: Optional[Tensor], batch: int, time: int, device: torch.device) -> Tensor:
    if padding is None:
        return torch.ones(batch, time, dtype=torch.bool, device=device)
    return ~padding.bool()


def fairseq_attention_view(module: MultiheadAttention, args: Tuple, kwargs: Dict[str, Any]) -> AttentionView:
    """fairseq ``MultiheadAttention`` called as self-attention with time-first ``query``; its additive
    ``attn_mask`` (T x T, -inf at the future in a decoder) and ``key_padding_mask`` (B x T)."""
    query = kwargs["query"] if "query" in kwargs else args[0]
    x = query.transpose(0, 1)  # batch-first
    batch, time, _ = x.shape
    padding = kwargs.get("key_padding_mask")
    allowed = _allowed(padding, batch, time, x.device)
    attn_mask = kwargs.get("attn_mask")
    if attn_mask is not None:
        allowed = allowed & torch.isfinite(attn_mask)[None, None, :time, :time]
    q, k, v = (_heads(proj(x), module.num_heads) for proj in (module.q_proj, module.k_proj, module.v_proj))
    return AttentionView(q, k, v, allowed, _valid(padding, batch, time, x.device))


def sanm_attention_view(module: MultiHeadedAttentionSANM, args: Tuple, kwargs: Dict[str, Any]) -> AttentionView:
    """SAN-M encoder attention, called as ``(x, padding_mask)`` on batch-first ``x`` (the FSMN memory is
    left out: it is a convolution of V, not a distribution over positions)."""
    x = args[0]
    padding = args[1] if len(args) > 1 else kwargs.get("padding_mask")
    batch, time, _ = x.shape
    q, k, v = (_heads(t, module.h) for t in module.linear_q_k_v(x).chunk(3, dim=-1))
    return AttentionView(q, k, v, _allowed(padding, batch, time, x.device), _valid(padding, batch, time, x.device))


def conv_view(module: ConvBranch, args: Tuple, kwargs: Dict[str, Any]) -> ConvView:
    """An LSRA convolution branch's kernels, softmax-normalised over the taps as its forward does (without
    DropConnect). Lightweight: one kernel per head for all steps; dynamic: one per step, from its input."""
    if isinstance(module, LightweightConvBranch):
        kernel = torch.softmax(module.weight, dim=-1).view(1, module.num_heads, 1, module.kernel_size)
    elif isinstance(module, DynamicConvBranch):
        x = module.linear_in(args[0])
        if module.glu:
            x = F.glu(x, dim=-1)
        time, batch, _ = x.shape
        logits = module.weight_linear(x).view(time, batch, module.num_heads, module.kernel_size)
        kernel = torch.softmax(logits, dim=-1).permute(1, 2, 0, 3)  # B x H x T x K
    else:
        raise DistillationSetupError(f"no kernel view of convolution branch {type(module).__name__}")
    return ConvView(kernel, module.padding[0])


VIEWS: Dict[type, Callable[[nn.Module, Tuple, Dict[str, Any]], AttentionView]] = {
    MultiheadAttention: fairseq_attention_view,
    MultiHeadedAttentionSANM: sanm_attention_view,
}


# --------------------------------------------------------------------------------------------
# Finding a layer and its attention.
# --------------------------------------------------------------------------------------------
def layer_stack(model: nn.Module, side: str) -> Sequence[nn.Module]:
    """The encoder's or decoder's layers: ``layers`` (fairseq transformer, the plugin's models),
    ``transformer_layers`` (fairseq's s2t_transformer encoder) or ``decoders`` (SAN-M decoder)."""
    part = getattr(model, side, None)
    for name in ("layers", "transformer_layers", "decoders"):
        layers = getattr(part, name, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise DistillationSetupError(f"{type(model).__name__} has no {side} layer stack ({side}.layers) to distil from")


def resolve_layer(index: int, count: int, option: str, who: str) -> int:
    """``index`` (negative: from the end) as a position in ``count`` layers; out of range -> one error."""
    if not -count <= index < count:
        raise DistillationSetupError(
            f"{option} {index} is out of range: the {who} has {count} layers (valid: {-count} to {count - 1})"
        )
    return index % count


def attention_module(self_attn: Optional[nn.Module]) -> Optional[nn.Module]:
    """The module of a layer's self-attention whose inputs give an :class:`AttentionView`, or None."""
    if isinstance(self_attn, MultiBranch):
        found = [branch for branch in self_attn.branches if isinstance(branch, MultiheadAttention)]
        return found[0] if found else None
    return self_attn if _view_function(self_attn) is not None else None


def _view_function(module: Optional[nn.Module]) -> Optional[Callable[[nn.Module, Tuple, Dict[str, Any]], AttentionView]]:
    return next((view for kind, view in VIEWS.items() if isinstance(module, kind)), None)


def attention_heads(module: nn.Module) -> int:
    """Head count of a module :func:`attention_module` returned."""
    return module.num_heads if isinstance(module, MultiheadAttention) else module.h


def conv_branches(self_attn: Optional[nn.Module]) -> List[ConvBranch]:
    """The convolution branches of an LSRA layer (none for any other self-attention)."""
    if not isinstance(self_attn, MultiBranch):
        return []
    return [branch for branch in self_attn.branches if isinstance(branch, ConvBranch)]


def _describe(self_attn: Optional[nn.Module]) -> str:
    return "none" if self_attn is None else type(self_attn).__name__


class LayerTap:
    """One layer of one side of a model whose self-attention (and LSRA convolutions) a pass records.

    ``who`` names the model in errors (e.g. ``teacher checkpoint.pt``); ``option`` is the layer option.
    ``attention``/``convolution``: which views the losses need; a layer without them is one error.
    """

    def __init__(
        self, model: nn.Module, side: str, index: int, option: str, who: str, attention: bool, convolution: bool
    ) -> None:
        self.side = side
        self.part = getattr(model, side, None)
        layers = layer_stack(model, side)
        self.index = resolve_layer(index, len(layers), option, f"{who} {side}")
        self_attn = getattr(layers[self.index], "self_attn", None)
        self.attention = attention_module(self_attn) if attention else None
        if attention and self.attention is None:
            raise DistillationSetupError(
                f"the {who} {side} layer {self.index} has no self-attention distribution (its self_attn is "
                f"{_describe(self_attn)}), which the attention and value-relation terms need: distil the other "
                "side (--distill-side) or set --attention-weight 0 --value-relation-weight 0"
            )
        self.convolutions = conv_branches(self_attn) if convolution else []
        if convolution and not self.convolutions:
            raise DistillationSetupError(
                f"the {who} {side} layer {self.index} has no LSRA convolution branch (its self_attn is "
                f"{_describe(self_attn)}), which --conv-attention-weight needs: use an LSRA student or set it to 0"
            )
        for branch in self.convolutions:
            if not branch.weight_softmax:
                raise DistillationSetupError(
                    f"--conv-attention-weight needs kernels normalised over their taps (--weight-softmax true); "
                    f"the {who} {side} layer {self.index} has --weight-softmax false"
                )
        self._inputs: Dict[nn.Module, Tuple[Tuple, Dict[str, Any]]] = {}

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Record the inputs of the tapped modules during the ``with`` block (the last call of each).

        A speech encoder that packs the valid frames in inference (``remove_padding``, e.g. in validation)
        keeps the padded layout meanwhile: its packed path calls the attention's ``forward_packed``, which
        records nothing, and a view needs (batch, time) positions anyway.
        """
        self._inputs.clear()
        modules = ([self.attention] if self.attention is not None else []) + self.convolutions
        handles = [
            module.register_forward_pre_hook(self._record(module), with_kwargs=True) for module in modules
        ]
        packs = getattr(self.part, "remove_padding", False)
        try:
            if packs:
                self.part.remove_padding = False
            yield
        finally:
            if packs:
                self.part.remove_padding = True
            for handle in handles:
                handle.remove()

    def _record(self, module: nn.Module) -> Callable[..., None]:
        def hook(_: nn.Module, args: Tuple, kwargs: Dict[str, Any]) -> None:
            self._inputs[module] = (args, kwargs)

        return hook

    def _recorded(self, module: nn.Module) -> Tuple[Tuple, Dict[str, Any]]:
        if module not in self._inputs:
            raise RuntimeError(f"{type(module).__name__} of layer {self.index} was not called in the forward pass")
        return self._inputs[module]

    def attention_view(self) -> AttentionView:
        """The recorded pass's :class:`AttentionView` (needs ``attention=True``)."""
        return _view_function(self.attention)(self.attention, *self._recorded(self.attention))

    def conv_views(self) -> List[ConvView]:
        """The recorded pass's :class:`ConvView` of each convolution branch (needs ``convolution=True``)."""
        return [conv_view(branch, *self._recorded(branch)) for branch in self.convolutions]
