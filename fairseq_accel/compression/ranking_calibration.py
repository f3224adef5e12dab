"""Ranking-aware activation calibration (Liu et al., "Post-Training Quantization for Vision Transformer",
arXiv 2106.14156, §3.3): for the inputs of an attention layer's query and key projections, the objective of
similarity-aware calibration (:mod:`~fairseq_accel.compression.similarity_calibration`) loses a term for the
attention weights whose order quantization reverses. Which keys a query attends to most is what the softmax
passes on; a range that keeps the projections' outputs correlated can still swap two close keys.

Ranking needs whole sentences (a row sample loses which rows attend to which), so calibration keeps, per
attention layer, the query-side and key-side inputs of a bounded sample of sentences, chosen by a content key
as :class:`~fairseq_accel.compression.similarity_calibration.RowSample` chooses rows (shards merge exactly).

The ranking loss here is the paper's hinge with margin 0, normalised to be unitless: over pairs of keys of each
query and head, the sum of how far quantization moves the attention weights past each other, divided by the
sum of their float differences (0: no pair reversed; 1: every pair reversed as far as it was apart). Rows with
more than :data:`PAIRS_PER_ROW` key pairs use a fixed random subset of them.
"""
from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from fairseq.modules import MultiheadAttention
from torch import Tensor, nn

from fairseq_accel.compression.similarity_calibration import content_keys
from fairseq_accel.modules.sanm_attention import MultiHeadedAttentionSANM, MultiHeadedCrossAttention

RANKING = "ranking"  # the --act-calib method
SAMPLE_SENTENCES = 16  # sentences kept per attention layer
PAIRS_PER_ROW = 496  # key pairs compared per query row: every pair of up to 32 keys
RANKING_WEIGHT = 1.0  # gamma of the paper's objective: correlation - gamma * ranking loss

Quantize = Callable[[Tensor], Tensor]
Weights = Dict[str, Tuple[Tensor, Optional[Tensor]]]


@dataclass(frozen=True)
class AttentionLayout:
    """Where one attention layer's queries and keys come from: rows ``[start, end)`` of a linear layer's
    output each (fused projections hold several), and how the attention weights follow from them."""

    query_layer: str
    query_rows: Tuple[int, int]
    key_layer: str
    key_rows: Tuple[int, int]
    heads: int
    scaling: float  # queries are multiplied by it before the dot products
    causal: bool  # query i sees keys up to i
    decoder_queries: bool  # queries are target positions (their padding is the target's)


# per attention class: the forward arguments holding the query-side input, the key-side input (None: the
# query's), the key padding mask, and whether tensors are time-first
_ARGUMENTS = {
    MultiheadAttention: ("query", "key", "key_padding_mask", True),
    MultiHeadedAttentionSANM: ("x", None, "padding_mask", False),
    MultiHeadedCrossAttention: ("x", "memory", "memory_padding_mask", False),
}


def _layout(name: str, module: nn.Module) -> Optional[AttentionLayout]:
    on_decoder = name.startswith("decoder.")
    if isinstance(module, MultiheadAttention):
        width = module.embed_dim
        return AttentionLayout(f"{name}.q_proj", (0, width), f"{name}.k_proj", (0, width),
                               module.num_heads, module.scaling, on_decoder and module.self_attention, on_decoder)
    if isinstance(module, (MultiHeadedAttentionSANM, MultiHeadedCrossAttention)):
        width = module.h * module.d_k
        if isinstance(module, MultiHeadedAttentionSANM):
            query, key = (f"{name}.linear_q_k_v", (0, width)), (f"{name}.linear_q_k_v", (width, 2 * width))
        else:
            query, key = (f"{name}.linear_q", (0, width)), (f"{name}.linear_k_v", (0, width))
        return AttentionLayout(*query, *key, module.h, module.d_k ** -0.5, False, on_decoder)
    return None


def attention_layouts(model: nn.Module) -> Dict[str, AttentionLayout]:
    """Every attention layer of ``model`` whose queries and keys ranking-aware calibration can follow, by
    module name (fairseq's ``MultiheadAttention``, also inside LSRA branches, and SAN-M's attentions)."""
    layouts = ((name, _layout(name, module)) for name, module in model.named_modules())
    return {name: layout for name, layout in layouts if layout is not None}


class SentenceSample:
    """At most ``capacity`` sentences' query-side and key-side inputs of one attention layer (padding
    removed): those with the smallest content keys."""

    def __init__(self, name: str, layout: AttentionLayout, capacity: int = SAMPLE_SENTENCES):
        self.name, self.layout, self.capacity = name, layout, capacity
        self.queries: List[Tensor] = []
        self.keys: List[Tensor] = []
        self.order = torch.empty(0, dtype=torch.float64)  # content key of each kept sentence

    def add(self, queries: Tensor, keys: Tensor) -> None:
        queries = queries.detach().float()
        self._keep([queries], [keys.detach().float()], content_keys(queries.mean(0, keepdim=True)))

    def merge(self, other: "SentenceSample") -> None:
        self._keep(other.queries, other.keys, other.order)

    def _keep(self, queries: List[Tensor], keys: List[Tensor], order: Tensor) -> None:
        queries, keys, order = self.queries + list(queries), self.keys + list(keys), torch.cat([self.order, order])
        kept = torch.argsort(order)[: self.capacity].tolist()
        self.queries, self.keys, self.order = [queries[i] for i in kept], [keys[i] for i in kept], order[kept]

    def state_dict(self) -> Dict[str, object]:
        return {"name": self.name, "layout": asdict(self.layout), "capacity": self.capacity,
                "queries": self.queries, "keys": self.keys, "order": self.order}

    @classmethod
    def from_state_dict(cls, state: Dict[str, object]) -> "SentenceSample":
        layout = dict(state["layout"])
        layout["query_rows"], layout["key_rows"] = tuple(layout["query_rows"]), tuple(layout["key_rows"])
        sample = cls(str(state["name"]), AttentionLayout(**layout), int(state["capacity"]))
        sample.queries, sample.keys, sample.order = list(state["queries"]), list(state["keys"]), state["order"]
        return sample


def sentences(module: nn.Module, args: tuple, kwargs: dict,
              target_padding: Optional[Tensor], decoder_queries: bool) -> Iterator[Tuple[Tensor, Tensor]]:
    """The (query-side input, key-side input) of each sentence of one teacher-forced attention call, padding
    removed; ``target_padding`` (batch, target length) masks decoder queries. Incremental calls give none."""
    query_arg, key_arg, padding_arg, time_first = next(
        spec for cls, spec in _ARGUMENTS.items() if isinstance(module, cls))
    bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
    if bound.get("incremental_state") is not None:
        return
    query = bound[query_arg]
    key = bound.get(key_arg) if key_arg else None
    key = query if key is None else key
    if time_first:
        query, key = query.transpose(0, 1), key.transpose(0, 1)
    key_padding = bound.get(padding_arg)
    query_padding = target_padding if decoder_queries else key_padding
    for index in range(query.size(0)):
        query_rows = query[index] if query_padding is None else query[index][~query_padding[index]]
        key_rows = key[index] if key_padding is None else key[index][~key_padding[index]]
        yield query_rows, key_rows


@lru_cache(maxsize=64)
def key_pairs(length: int) -> Tuple[Tensor, Tensor]:
    """The pairs of key positions compared in a row of ``length`` keys: all of them up to
    :data:`PAIRS_PER_ROW`, else that many drawn at random (the same ones for every row of this length)."""
    first, second = torch.triu_indices(length, length, offset=1)
    if first.numel() > PAIRS_PER_ROW:
        chosen = torch.randperm(first.numel(), generator=torch.Generator().manual_seed(length))[:PAIRS_PER_ROW]
        first, second = first[chosen], second[chosen]
    return first, second


def attention_weights(query_rows: Tensor, key_rows: Tensor, layout: AttentionLayout,
                      query_weights: Tuple[Tensor, Optional[Tensor]],
                      key_weights: Tuple[Tensor, Optional[Tensor]]) -> Tensor:
    """The attention weights (heads, queries, keys) of one sentence from the projections' inputs."""

    def project(rows: Tensor, weights: Tuple[Tensor, Optional[Tensor]], span: Tuple[int, int]) -> Tensor:
        weight, bias = weights
        out = rows @ weight[span[0]:span[1]].t()
        if bias is not None:
            out = out + bias[span[0]:span[1]]
        return out.view(rows.size(0), layout.heads, -1).transpose(0, 1)

    queries = project(query_rows, query_weights, layout.query_rows) * layout.scaling
    keys = project(key_rows, key_weights, layout.key_rows)
    scores = queries @ keys.transpose(1, 2)
    if layout.causal:
        future = torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return scores.softmax(dim=-1)


def reversed_order(reference: Tensor, quantized: Tensor) -> Tuple[float, float]:
    """(how far ``quantized`` moves pairs of attention weights past each other, how far apart they were in
    ``reference``), summed over the pairs of :func:`key_pairs` of every row."""
    first, second = key_pairs(reference.size(-1))
    apart = reference[..., first] - reference[..., second]
    moved = quantized[..., first] - quantized[..., second]
    return float((-moved * apart.sign()).clamp_min(0).sum()), float(apart.abs().sum())


def ranking_penalty(samples: Sequence[SentenceSample], group: Sequence[str], weights: Weights,
                    gamma: float = RANKING_WEIGHT) -> Optional[Callable[[Quantize], float]]:
    """gamma times the ranking loss of the attention layers in ``samples`` whose query or key projection is
    in ``group`` (the layers that read the input being calibrated), as a function of the group's input
    quantizer; the other side of each attention stays float. None where no attention involves the group."""
    involved = [(sample, sample.layout.query_layer in group, sample.layout.key_layer in group)
                for sample in samples if sample.queries
                and {sample.layout.query_layer, sample.layout.key_layer} & set(group)]
    if not involved:
        return None
    references = [[attention_weights(q, k, s.layout, weights[s.layout.query_layer], weights[s.layout.key_layer])
                   for q, k in zip(s.queries, s.keys)] for s, _, _ in involved]

    def penalty(quantize: Quantize) -> float:
        moved = apart = 0.0
        for (sample, on_query, on_key), sample_references in zip(involved, references):
            layout = sample.layout
            for q, k, reference in zip(sample.queries, sample.keys, sample_references):
                quantized = attention_weights(quantize(q) if on_query else q, quantize(k) if on_key else k, layout,
                                              weights[layout.query_layer], weights[layout.key_layer])
                sentence_moved, sentence_apart = reversed_order(reference, quantized)
                moved, apart = moved + sentence_moved, apart + sentence_apart
        return gamma * moved / apart if apart > 0 else 0.0

    return penalty
