"""Ranking-aware calibration (fairseq_accel/compression/ranking_calibration.py, arXiv 2106.14156 §3.3): the
reversed-order loss on a hand-computed case and against a loop over every pair, the attention weights rebuilt
from the sampled inputs equal the ones each attention class computes (fairseq's, in an LSRA branch or not,
causal or cross; SAN-M's self- and cross-attention), the sentence sample takes each sentence once without
padding whatever the batching, and the calibrator's choice follows the ranking term as its weight grows."""
from itertools import combinations
from typing import Dict, List, Tuple

import pytest
import torch
from fairseq.modules import MultiheadAttention
from torch import nn

from fairseq_accel.compression.activation_calibration import LinearInputCalibrator, linear_layers
from fairseq_accel.compression.calibration import CalibrationError
from fairseq_accel.compression.ranking_calibration import (
    RANKING,
    SentenceSample,
    attention_layouts,
    attention_weights,
    key_pairs,
    ranking_penalty,
    reversed_order,
)
from fairseq_accel.compression.similarity_calibration import CANDIDATES, SMALLEST_FRACTION, similarity_threshold
from fairseq_accel.inference.int8_execution import call_projection_modules
from fairseq_accel.modules.int8_linear import SIGNED_ZERO_POINT, activation_levels, activation_max_level
from fairseq_accel.modules.sanm_attention import MultiHeadedAttentionSANM, MultiHeadedCrossAttention

WIDTH, HEADS = 16, 4


def test_reversed_order_by_hand() -> None:
    reference = torch.tensor([[0.5, 0.3, 0.2]])
    quantized = torch.tensor([[0.3, 0.5, 0.2]])  # keys 0 and 1 swapped: 0.2 past each other, apart 0.2
    assert reversed_order(reference, quantized) == pytest.approx((0.2, 0.2 + 0.3 + 0.1))
    assert reversed_order(reference, reference)[0] == 0.0


def test_reversed_order_equals_a_loop_over_every_pair() -> None:
    generator = torch.Generator().manual_seed(1)
    reference = torch.rand(2, 3, 9, generator=generator).softmax(-1)
    quantized = (reference + 0.05 * torch.randn(2, 3, 9, generator=generator)).softmax(-1)
    moved = apart = 0.0
    for head in range(2):
        for row in range(3):
            for a, b in combinations(range(9), 2):
                difference = float(reference[head, row, a] - reference[head, row, b])
                shift = float(quantized[head, row, a] - quantized[head, row, b])
                moved += max(0.0, -shift * (1 if difference > 0 else -1 if difference < 0 else 0))
                apart += abs(difference)
    assert reversed_order(reference, quantized) == pytest.approx((moved, apart), rel=1e-5)


def test_long_rows_compare_a_fixed_subset_of_pairs() -> None:
    first, second = key_pairs(200)
    assert len(first) == 496 and bool((first < second).all()) and int(second.max()) < 200
    assert torch.equal(key_pairs(200)[0], first)


class Branch(nn.Module):
    """A named slot, so module names follow the model's ("encoder.layers.0.self_attn", ...)."""


def named(**modules: nn.Module) -> nn.Module:
    root = nn.Module()
    for path, module in modules.items():
        parent = root
        for part in path.split(".")[:-1]:
            if not hasattr(parent, part):
                parent.add_module(part, Branch())
            parent = getattr(parent, part)
        parent.add_module(path.split(".")[-1], module)
    return root.eval()


def calibrated_sentences(model: nn.Module, call, target_padding: torch.Tensor) -> Dict[str, SentenceSample]:
    calibrator = LinearInputCalibrator(linear_layers(model), attentions=attention_layouts(model))
    calibrator.target_padding = target_padding
    call_projection_modules(model)  # fairseq's attention through its modules, as calibration runs it
    with torch.no_grad(), calibrator.hooks(model):
        call()
    return calibrator.sentences


def weights_of(model: nn.Module) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    return {name: (m.weight.detach(), None if m.bias is None else m.bias.detach())
            for name, m in model.named_modules() if isinstance(m, nn.Linear)}


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")  # (fairseq's decoder masks so too)
def test_fairseq_attention_weights_are_rebuilt_from_the_sampled_inputs() -> None:
    torch.manual_seed(0)
    model = named(**{"decoder.layers.0.self_attn": MultiheadAttention(WIDTH, HEADS, self_attention=True),
                     "decoder.layers.0.encoder_attn": MultiheadAttention(WIDTH, HEADS, encoder_decoder_attention=True),
                     "encoder.layers.0.self_attn.branches.0": MultiheadAttention(WIDTH, HEADS, self_attention=True)})
    modules = dict(model.named_modules())
    self_attention, cross_attention = modules["decoder.layers.0.self_attn"], modules["decoder.layers.0.encoder_attn"]
    encoder_attention = modules["encoder.layers.0.self_attn.branches.0"]
    target = torch.randn(5, 2, WIDTH)  # (time, batch, width): sentence 1 has 2 target pads at the end
    source = torch.randn(7, 2, WIDTH)
    target_padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    source_padding = torch.tensor([[True] * 2 + [False] * 5, [False] * 7])  # left-padded source
    future = torch.triu(torch.full((5, 5), float("-inf")), 1)
    seen = {}

    def run() -> None:
        seen["self"] = self_attention(query=target, key=target, value=target, key_padding_mask=target_padding,
                                       attn_mask=future, need_weights=True, need_head_weights=True)[1]
        seen["cross"] = cross_attention(query=target, key=source, value=source, key_padding_mask=source_padding,
                                           static_kv=True, need_weights=True, need_head_weights=True)[1]
        seen["encoder"] = encoder_attention(query=source, key=source, value=source, key_padding_mask=source_padding,
                                            need_weights=True, need_head_weights=True)[1]

    samples = calibrated_sentences(model, run, target_padding)
    weights = weights_of(model)
    cases = {"decoder.layers.0.self_attn": ("self", target_padding, target_padding),
             "decoder.layers.0.encoder_attn": ("cross", target_padding, source_padding),
             "encoder.layers.0.self_attn.branches.0": ("encoder", source_padding, source_padding)}
    for name, (key, query_padding, key_padding) in cases.items():
        sample, layout = samples[name], samples[name].layout
        assert layout.causal == (key == "self") and len(sample.queries) == 2
        rebuilt = [attention_weights(q, k, layout, weights[layout.query_layer], weights[layout.key_layer])
                   for q, k in zip(sample.queries, sample.keys)]
        for index in range(2):  # the sample keeps sentences in the order of their content keys
            expected = seen[key][:, index][:, ~query_padding[index]][..., ~key_padding[index]]
            assert any(r.shape == expected.shape and torch.allclose(r, expected, atol=1e-6) for r in rebuilt), \
                (name, index)


def test_sanm_attention_weights_are_rebuilt_from_the_sampled_inputs() -> None:
    """SAN-M's attentions return no weights: their outputs are rebuilt from the rebuilt weights."""
    torch.manual_seed(0)
    model = named(**{"encoder.layers.0.self_attn": MultiHeadedAttentionSANM(HEADS, WIDTH, WIDTH, 0.0, 5),
                     "decoder.layers.0.src_attn": MultiHeadedCrossAttention(HEADS, WIDTH, 0.0, WIDTH)})
    modules = dict(model.named_modules())
    self_attention, cross_attention = modules["encoder.layers.0.self_attn"], modules["decoder.layers.0.src_attn"]
    memory = torch.randn(1, 6, WIDTH)  # (batch, time, width), one sentence: the order of a sample is its own
    target = torch.randn(1, 4, WIDTH)
    memory_padding = torch.tensor([[False] * 4 + [True] * 2])
    outputs = {}

    def run() -> None:
        outputs["self"] = self_attention(memory, memory_padding)
        outputs["cross"] = cross_attention(target, memory, memory_padding)

    samples = calibrated_sentences(model, run, torch.zeros(1, 4, dtype=torch.bool))
    weights = weights_of(model)
    width = WIDTH
    for name, attention, key in (("encoder.layers.0.self_attn", self_attention, "self"),
                                 ("decoder.layers.0.src_attn", cross_attention, "cross")):
        sample, layout = samples[name], samples[name].layout
        queries, keys = sample.queries[0], sample.keys[0]
        assert queries.shape[0] == keys.shape[0] == 4  # memory padding removed; the 4 target positions
        probabilities = attention_weights(queries, keys, layout, weights[layout.query_layer], weights[layout.key_layer])
        if key == "self":
            values = attention.linear_q_k_v(keys)[:, 2 * width:]
            memory_term = attention.forward_fsmn(values[None], None)[0]
        else:
            values = attention.linear_k_v(keys)[:, width:]
            memory_term = 0
        context = (probabilities @ values.view(-1, HEADS, width // HEADS).transpose(0, 1)).transpose(0, 1)
        rebuilt = attention.linear_out(context.reshape(-1, width)) + memory_term
        assert torch.allclose(rebuilt, outputs[key][0, : rebuilt.shape[0]], atol=1e-5), name


def test_sentence_sample_is_the_same_in_any_order_and_split() -> None:
    generator = torch.Generator().manual_seed(2)
    sentences = [(torch.randn(n, 4, generator=generator), torch.randn(n + 1, 4, generator=generator))
                 for n in range(3, 13)]
    layout = attention_layouts(named(**{"encoder.a": MultiheadAttention(4, 2, self_attention=True)}))["encoder.a"]
    forward, backward, part_a, part_b = (SentenceSample("a", layout, capacity=4) for _ in range(4))
    for q, k in sentences:
        forward.add(q, k)
    for q, k in reversed(sentences):
        backward.add(q, k)
    for q, k in sentences[:6]:
        part_a.add(q, k)
    for q, k in sentences[6:]:
        part_b.add(q, k)
    part_a.merge(SentenceSample.from_state_dict(part_b.state_dict()))
    for other in (backward, part_a):
        assert torch.equal(other.order, forward.order)
        assert all(torch.equal(a, b) for a, b in zip(other.queries + other.keys, forward.queries + forward.keys))


def fused_self_attention() -> Tuple[LinearInputCalibrator, Dict[str, Tuple[torch.Tensor, None]], List[str]]:
    """An encoder self-attention whose query and key inputs have one large channel, calibrated on 6 sentences."""
    torch.manual_seed(4)
    attention = MultiheadAttention(WIDTH, HEADS, self_attention=True, bias=False)
    model = named(**{"encoder.layers.0.self_attn": attention})
    names = [f"encoder.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]
    calibrator = LinearInputCalibrator(linear_layers(model), sample_rows=512, attentions=attention_layouts(model))
    x = torch.randn(9, 6, WIDTH)
    x[::4, :, 3] = 12.0
    call_projection_modules(model)
    with torch.no_grad(), calibrator.hooks(model):
        attention(query=x, key=x, value=x, key_padding_mask=None)
    calibrator.batches = 1
    return calibrator, weights_of(model), names


def test_choice_follows_the_ranking_term_as_its_weight_grows() -> None:
    calibrator, weights, names = fused_self_attention()
    without = calibrator.quantizers(RANKING, names, weights, ranking_weight=0.0)
    pearson = calibrator.quantizers("pearson", names, weights)
    assert without == pearson  # weight 0: the similarity-aware choice
    only_ranking = calibrator.quantizers(RANKING, names, weights, ranking_weight=1e6)
    sample = calibrator.samples[names[0]]
    penalty = ranking_penalty(list(calibrator.sentences.values()), names, weights)
    largest = float(sample.rows.abs().max())
    max_level = activation_max_level(SIGNED_ZERO_POINT)
    losses = {}
    for fraction in torch.linspace(SMALLEST_FRACTION, 1.0, CANDIDATES).tolist():
        scale = largest * fraction / max_level
        losses[largest * fraction] = penalty(lambda t: activation_levels(t, scale, SIGNED_ZERO_POINT) * scale)
    chosen = min(losses, key=lambda threshold: abs(threshold - only_ranking[names[0]][0] * max_level))
    assert losses[chosen] == min(losses.values())  # (ties between ranges: the correlation decides)
    assert len({scale for scale, _ in only_ranking.values()}) == 1  # the fused Q/K/V keep one range
    assert min(losses.values()) < next(iter(losses.values()))  # the term tells ranges apart (smallest range: worst)
    assert similarity_threshold(sample, [weights[n] for n in names], SIGNED_ZERO_POINT, penalty) > 0


def test_ranking_needs_the_sentences() -> None:
    calibrator, weights, names = fused_self_attention()
    unsampled = LinearInputCalibrator(calibrator.histograms, sample_rows=512)
    unsampled.samples = calibrator.samples
    unsampled.batches = 1
    with pytest.raises(CalibrationError, match="needs the sentences each attention layer saw"):
        unsampled.quantizers(RANKING, names, weights)


def test_states_of_the_earlier_format_are_refused_in_one_line() -> None:
    """Version 3 added the attention sentences: a version-2 state (no "sentences") is named, not a KeyError."""
    calibrator, _, _ = fused_self_attention()
    state = calibrator.state_dict({})
    del state["sentences"]
    state["version"] = 2
    with pytest.raises(CalibrationError, match="old.calib: not a calibration state of version 3 \\(got 2\\)"):
        LinearInputCalibrator(calibrator.histograms).load_state_dict(state, "old.calib")
