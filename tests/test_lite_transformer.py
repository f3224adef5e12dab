"""LSRA / Lite Transformer: incremental == full, padding invariance, beam search, registration, bad specs."""
import pytest
import torch
from fairseq.data import data_utils
from fairseq.models import ARCH_MODEL_REGISTRY, MODEL_REGISTRY
from fairseq.sequence_generator import SequenceGenerator

import fairseq_accel.plugin  # noqa: F401  (registers the plugin)
from fairseq_accel.models.lite_transformer import LiteTransformerModel
from model_builders import build_translation_model, random_tokens

CONV_TYPES = ["lightweight", "dynamic"]
TOLERANCE = 1e-5


def small_lsra(conv: str, glu: bool = False, **overrides):
    """A 64-d LSRA model with kernels long enough (up to 15) to exceed the test sentences."""
    branches = ["attn:1:32:4", f"{conv}:default:32:4"]
    settings = dict(
        encoder_embed_dim=64, decoder_embed_dim=64, encoder_branch_type=branches, decoder_branch_type=branches,
        encoder_glu=glu, decoder_glu=glu, encoder_kernel_size_list=[3, 7, 15], decoder_kernel_size_list=[3, 7, 15],
    )
    settings.update(overrides)
    return build_translation_model("lite_transformer_mini", **settings)


def test_every_plugin_name_maps_to_our_class():
    assert MODEL_REGISTRY["lite_transformer"] is LiteTransformerModel
    for arch in ["lite_transformer_iwslt_de_en", "lite_transformer_wmt_en_de", "lite_transformer_wmt_en_fr",
                 "lite_transformer_mini"]:
        assert ARCH_MODEL_REGISTRY[arch] is LiteTransformerModel, arch


@pytest.mark.parametrize("conv", CONV_TYPES)
@pytest.mark.parametrize("glu", [False, True])
def test_incremental_decoding_equals_full_forward(conv, glu):
    model = small_lsra(conv, glu=glu)
    generator = torch.Generator().manual_seed(1)
    dictionary = model.decoder.dictionary
    src = random_tokens(dictionary, 3, 9, generator)
    tgt = random_tokens(dictionary, 3, 20, generator)  # longer than the largest kernel
    with torch.no_grad():
        encoder_out = model.encoder(src, src_lengths=torch.full((3,), 9))
        full, _ = model.decoder(tgt, encoder_out=encoder_out)
        state = {}
        for step in range(tgt.size(1)):
            out, _ = model.decoder(tgt[:, : step + 1], encoder_out=encoder_out, incremental_state=state)
            assert (out[:, 0] - full[:, step]).abs().max().item() <= TOLERANCE, f"step {step}"


@pytest.mark.parametrize("conv", CONV_TYPES)
def test_decoder_is_causal(conv):
    model = small_lsra(conv)
    generator = torch.Generator().manual_seed(2)
    dictionary = model.decoder.dictionary
    src = random_tokens(dictionary, 2, 7, generator)
    tgt = random_tokens(dictionary, 2, 12, generator)
    changed = tgt.clone()
    changed[:, 6:] = random_tokens(dictionary, 2, 6, generator)
    with torch.no_grad():
        out, _ = model(src, torch.full((2,), 7), tgt)
        out_changed, _ = model(src, torch.full((2,), 7), changed)
    assert (out[:, :6] - out_changed[:, :6]).abs().max().item() <= TOLERANCE
    assert (out[:, 6:] - out_changed[:, 6:]).abs().max().item() > 1e-3


def padded_batch_error(model, lengths, left_pad: bool, seed: int = 3) -> float:
    """Largest difference between each sentence's outputs inside a padded batch and alone."""
    generator = torch.Generator().manual_seed(seed)
    dictionary = model.decoder.dictionary
    sentences = [random_tokens(dictionary, 1, n, generator)[0] for n in lengths]
    targets = random_tokens(dictionary, len(lengths), 6, generator)
    src = data_utils.collate_tokens(sentences, dictionary.pad(), left_pad=left_pad)
    src_lengths = torch.tensor(lengths)
    worst = 0.0
    with torch.no_grad():
        batched, _ = model(src, src_lengths, targets)
        for index, sentence in enumerate(sentences):
            alone, _ = model(sentence[None], src_lengths[index : index + 1], targets[index : index + 1])
            worst = max(worst, (batched[index] - alone[0]).abs().max().item())
    return worst


@pytest.mark.parametrize("conv", CONV_TYPES)
@pytest.mark.parametrize("left_pad", [True, False])
def test_padded_batch_gives_the_same_outputs_as_alone(conv, left_pad):
    assert padded_batch_error(small_lsra(conv), [4, 11, 7], left_pad) <= TOLERANCE


def test_reference_masking_leaks_padding_so_the_check_can_fail(monkeypatch):
    """The reference zeroes padding *before* the conv branch's biased input projection; emulate that and
    the padded-batch check must fail, so it does test where our mask sits."""
    from fairseq_accel.modules.lsra_convolution import ConvBranch

    forward = ConvBranch.forward

    def reference_forward(self, x, key_padding_mask=None, incremental_state=None):
        if key_padding_mask is not None:
            x = x.masked_fill(key_padding_mask.transpose(0, 1).unsqueeze(-1), 0.0)
        return forward(self, x, None, incremental_state)

    monkeypatch.setattr(ConvBranch, "forward", reference_forward)
    assert padded_batch_error(small_lsra("lightweight"), [4, 11, 7], left_pad=True) > 1e-3


@pytest.mark.parametrize("conv", CONV_TYPES)
def test_beam_search_scores_match_full_forward_and_batching(conv):
    """Stock SequenceGenerator reorders the LSRA caches between beams; scores must equal a full forward."""
    model = small_lsra(conv)
    dictionary = model.decoder.dictionary
    generator = torch.Generator().manual_seed(4)
    sentences = [random_tokens(dictionary, 1, n, generator)[0] for n in (5, 9, 7)]
    src = data_utils.collate_tokens(sentences, dictionary.pad(), left_pad=True)
    sample = {"net_input": {"src_tokens": src, "src_lengths": torch.tensor([5, 9, 7])}}
    search = SequenceGenerator([model], dictionary, beam_size=4, max_len_b=12, min_len=3)
    with torch.no_grad():
        hypotheses = search.forward(sample)
        for index, sentence in enumerate(sentences):
            alone = search.forward({"net_input": {"src_tokens": sentence[None], "src_lengths": torch.tensor([len(sentence)])}})
            assert [h["tokens"].tolist() for h in alone[0]] == [h["tokens"].tolist() for h in hypotheses[index]]
            for hypothesis in hypotheses[index]:
                tokens = hypothesis["tokens"]
                prev = torch.cat([tokens.new_tensor([dictionary.eos()]), tokens[:-1]])[None]
                logits, _ = model(sentence[None], torch.tensor([len(sentence)]), prev)
                lprobs = model.get_normalized_probs((logits, None), log_probs=True)[0]
                scores = lprobs.gather(1, tokens[:, None]).squeeze(1)
                assert torch.allclose(scores, hypothesis["positional_scores"], atol=1e-4)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(encoder_branch_type=["attn:1:32", "lightweight:default:32:4"]), "has 3 field(s); expected 4"),
        (dict(encoder_branch_type=["attn:1:32:4", "depthwise:default:32:4"]), "unknown type 'depthwise'"),
        (dict(decoder_branch_type=["attn:1:32:4", "lightweight:default:16:4"]), "do not sum to --decoder-embed-dim 64"),
        (dict(encoder_kernel_size_list=[3, 7]), "--encoder-kernel-size-list has 2 entries [3, 7] but --encoder-layers is 3"),
        (dict(encoder_branch_type=["attn:1:32:5", "lightweight:default:32:4"]), "dim 32 is not divisible by heads 5"),
        (dict(encoder_branch_type=["attn:1:32:4", "lightweight:wide:32:4"]), "kernel must be a positive integer, got 'wide'"),
    ],
)
def test_malformed_branch_specs_give_one_clear_error(overrides, message):
    with pytest.raises(ValueError) as error:
        small_lsra("lightweight", **overrides)
    assert message in str(error.value)
