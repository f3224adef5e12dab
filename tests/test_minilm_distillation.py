"""minilm_distillation: the loss math on hand-made tensors, the layer taps on real models, a frozen teacher that
never trains nor is saved, every bad-input error, and a tiny fairseq-train run."""
import shutil
from pathlib import Path

import pytest
import torch
from fairseq import options, tasks
from fairseq.criterions import CRITERION_REGISTRY
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

from conftest import TINY_TRAIN, USER_DIR, cli_output, run_cli, tiny_lsra
from model_builders import build_speech_model, build_translation_model, random_tokens, toy_dictionary
from fairseq_accel.compat.checkpoint_files import CheckpointLoadError, CheckpointNotFoundError
from fairseq_accel.compat.checkpoint_loading import read_checkpoint
from fairseq_accel.criterions.attention_capture import AttentionView, ConvView, DistillationSetupError, LayerTap
from fairseq_accel.criterions.minilm_distillation import (
    MiniLMDistillationCriterion,
    conv_attention_loss,
    ctc_kd_loss,
    minilm_losses,
    relation_heads_of,
    window_distribution,
    word_kd_loss,
)
from fairseq_accel.tasks.vocabulary_check import VocabularyMismatchError

# A 1+1-layer, 16-dim LSRA student: the teacher's (tiny_lsra) attention heads (2), half its width.
STUDENT = [
    "--arch", "lite_transformer_mini", "--encoder-embed-dim", "16", "--decoder-embed-dim", "16",
    "--encoder-branch-type", "attn:1:8:2", "dynamic:default:8:2", "--decoder-branch-type", "attn:1:8:2",
    "lightweight:default:8:2", "--encoder-layers", "1", "--decoder-layers", "1", "--share-all-embeddings",
]
DISTILL = ["--criterion", "minilm_distillation", "--conv-attention-weight", "0.5", "--distill-side", "both"]


# --------------------------------------------------------------------------------------------
# The math.
# --------------------------------------------------------------------------------------------
def random_view(batch=2, heads=2, time=5, dim=4, seed=0, padded=True, causal=False) -> AttentionView:
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, time, dim, generator=generator) for _ in range(3))
    valid = torch.ones(batch, time, dtype=torch.bool)
    if padded:
        valid[0, -2:] = False  # the first sentence is 3 steps long
    allowed = valid[:, None, None, :].expand(batch, 1, time, time)
    if causal:
        allowed = allowed & torch.ones(time, time, dtype=torch.bool).tril()
    return AttentionView(q, k, v, allowed, valid)


def test_minilm_terms_are_zero_for_the_teacher_itself_and_positive_otherwise():
    teacher = random_view()
    at, vr = minilm_losses(teacher, teacher)
    assert at.item() == pytest.approx(0.0, abs=1e-6) and vr.item() == pytest.approx(0.0, abs=1e-6)
    student = random_view(seed=1, dim=2)  # another width: MiniLM needs equal heads only
    at, vr = minilm_losses(teacher, student)
    assert at.item() > 0.01 and vr.item() > 0.01


def test_minilm_terms_ignore_padding_and_respect_the_causal_mask():
    teacher, student = random_view(), random_view(seed=1)
    at, vr = minilm_losses(teacher, student)
    # changing what sits at padded positions changes nothing
    noisy = student._replace(q=student.q.clone(), k=student.k.clone(), v=student.v.clone())
    for tensor in (noisy.q, noisy.k, noisy.v):
        tensor[0, :, -2:] = 100.0
    assert torch.allclose(torch.stack(minilm_losses(teacher, noisy)), torch.stack([at, vr]))
    # with a causal mask, the first query sees only itself: its KL is 0 whatever the keys
    causal_t, causal_s = random_view(causal=True, padded=False), random_view(seed=1, causal=True, padded=False)
    only_first = causal_s.valid.clone()
    only_first[:, 1:] = False
    at, vr = minilm_losses(causal_t._replace(valid=only_first), causal_s._replace(valid=only_first))
    assert at.item() == pytest.approx(0.0, abs=1e-6) and vr.item() == pytest.approx(0.0, abs=1e-6)


def test_other_head_counts_use_minilmv2_relations():
    teacher = random_view(heads=4, dim=2)
    # the same Q, K, V split into 2 heads of 4: the relations over 4 relation heads are identical
    student = teacher._replace(q=relation_heads_of(teacher.q, 2), k=relation_heads_of(teacher.k, 2),
                               v=relation_heads_of(teacher.v, 2))
    at, vr = minilm_losses(teacher, student)
    assert at.item() == pytest.approx(0.0, abs=1e-6) and vr.item() == pytest.approx(0.0, abs=1e-6)
    at, vr = minilm_losses(teacher, random_view(heads=2, dim=4, seed=2))  # default: the teacher's 4 heads
    assert at.item() > 0.01 and vr.item() > 0.01
    with pytest.raises(DistillationSetupError, match="3 relation heads .* do not divide the attention width 8"):
        minilm_losses(teacher, student, relation_heads=3)


def test_positions_that_do_not_line_up_are_one_clear_error():
    with pytest.raises(DistillationSetupError, match="teacher and student layers see different positions"):
        minilm_losses(random_view(time=5), random_view(time=4))


def test_word_kd_is_a_temperature_scaled_kl_summed_over_target_tokens():
    logits = torch.randn(2, 3, 7)
    keep = torch.tensor([[True, True, True], [True, False, False]])
    assert word_kd_loss(logits, logits, keep, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    student = torch.randn(2, 3, 7)
    expected = sum(
        torch.nn.functional.kl_div(student[b, t].log_softmax(-1), logits[b, t].log_softmax(-1), log_target=True,
                                   reduction="sum")
        for b, t in ((0, 0), (0, 1), (0, 2), (1, 0))
    )
    assert word_kd_loss(logits, student, keep, 1.0).item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="--kd-temperature must be > 0"):
        word_kd_loss(logits, student, keep, 0.0)


def test_ctc_kd_is_a_mean_kl_over_valid_frames():
    teacher = torch.randn(4, 2, 5).log_softmax(-1)  # T x B x V
    lengths = torch.tensor([4, 2])
    assert ctc_kd_loss((teacher, lengths), (teacher, lengths)).item() == pytest.approx(0.0, abs=1e-6)
    student = torch.randn(4, 2, 5).log_softmax(-1).requires_grad_()
    frames = [(t, b) for b in range(2) for t in range(int(lengths[b]))]
    expected = sum(torch.nn.functional.kl_div(student[t, b], teacher[t, b], log_target=True, reduction="sum")
                   for t, b in frames) / len(frames)
    loss = ctc_kd_loss((teacher, lengths), (student, lengths))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert student.grad[2:, 1].abs().sum() == 0  # padding frames get no gradient
    with pytest.raises(DistillationSetupError, match="--ctc-kd-weight: .* same front-end subsampling"):
        ctc_kd_loss((teacher, lengths), (student[:3], torch.tensor([3, 2])))


def test_window_distribution_takes_the_kernels_taps_and_renormalises():
    probs = torch.tensor([[[0.5, 0.25, 0.25], [0.2, 0.6, 0.2], [0.1, 0.1, 0.8]]])
    causal = window_distribution(probs, kernel_size=2, left=1)  # taps t-1, t
    assert torch.allclose(causal[0], torch.tensor([[0.0, 1.0], [0.25, 0.75], [1 / 9, 8 / 9]]))
    centred = window_distribution(probs, kernel_size=3, left=1)  # taps t-1, t, t+1
    assert torch.allclose(centred[0, 1], torch.tensor([0.2, 0.6, 0.2]))
    assert torch.allclose(centred[0, 0], torch.tensor([0.0, 2 / 3, 1 / 3]))


def test_conv_attention_loss_is_zero_when_the_kernel_is_the_teachers_window():
    teacher = random_view(padded=False)
    log_probs = torch.log_softmax(teacher.q @ teacher.k.transpose(-1, -2) / 2.0, dim=-1)
    target = window_distribution(log_probs.exp().mean(dim=1), 3, 1)  # batch x time x K
    dynamic = ConvView(target.unsqueeze(1).expand(-1, 2, -1, -1), left=1)  # both conv heads = the target
    assert conv_attention_loss(log_probs, dynamic, teacher.valid).item() == pytest.approx(0.0, abs=1e-6)
    lightweight = ConvView(torch.tensor([0.7, 0.2, 0.1]).view(1, 1, 1, 3), left=1)
    assert conv_attention_loss(log_probs, lightweight, teacher.valid).item() > 0.01


# --------------------------------------------------------------------------------------------
# Layer taps on real models.
# --------------------------------------------------------------------------------------------
def tap_views(model, side, **kwargs):
    tap = LayerTap(model, side, -1, "--student-layer", "student", **kwargs)
    dictionary = model.decoder.dictionary
    tokens = random_tokens(dictionary, 2, 6, torch.Generator().manual_seed(0))
    tokens[0, :2] = dictionary.pad()  # left-padded source
    with tap.recording():
        model(tokens, torch.tensor([4, 6]), random_tokens(dictionary, 2, 5, torch.Generator().manual_seed(1)))
    return tap


def test_taps_see_fairseq_attention_lsra_branches_and_sanm():
    lsra = build_translation_model("lite_transformer_mini", encoder_embed_dim=32, decoder_embed_dim=32,
                                   encoder_layers=2, decoder_layers=2)
    tap = tap_views(lsra, "encoder", attention=True, convolution=True)
    view = tap.attention_view()
    assert view.q.shape == (2, 4, 6, 4) and view.valid[0].tolist() == [False, False] + [True] * 4
    # the recomputed distribution is the one fairseq's attention computes (its weights are the mean over heads)
    attention = lsra.encoder.layers[-1].self_attn.branches[0]
    _, kwargs = tap._inputs[attention]
    _, fairseq_weights = attention(**{**kwargs, "need_weights": True})
    ours = torch.softmax((view.q @ view.k.transpose(-1, -2) / 2.0).masked_fill(~view.allowed, float("-inf")), -1)
    assert torch.allclose(ours.mean(dim=1)[:, 2:], fairseq_weights[:, 2:], atol=1e-5)  # rows of real tokens
    (conv,) = tap.conv_views()
    assert conv.kernel.shape == (1, 4, 1, 7) and conv.left == 3  # lightweight, kernel 7 (layer 2), centred
    assert torch.allclose(conv.kernel.sum(-1), torch.ones(1))
    decoder = tap_views(lsra, "decoder", attention=True, convolution=False).attention_view()
    assert not decoder.allowed[0, 0, 0, 1] and decoder.allowed[0, 0, 1, 0]  # causal
    transformer = build_translation_model("transformer", encoder_embed_dim=16, decoder_embed_dim=16,
                                          encoder_attention_heads=2, decoder_attention_heads=2)
    assert tap_views(transformer, "decoder", attention=True, convolution=False).attention_view().q.shape[1] == 2
    sanm = build_speech_model("s2t_sanm_mini")
    tap = LayerTap(sanm, "encoder", 0, "--student-layer", "student", attention=True, convolution=False)
    with tap.recording():
        sanm(torch.randn(2, 40, 80), torch.tensor([40, 30]), torch.full((2, 3), 4))
    view = tap.attention_view()
    assert view.q.shape[:2] == (2, sanm.encoder.layers[0].self_attn.h) and not view.valid[1].all()


def test_a_layer_without_attention_or_convolution_is_one_clear_error():
    sanm = build_speech_model("s2t_sanm_mini")
    with pytest.raises(DistillationSetupError, match=r"teacher t.pt decoder layer \d+ has no self-attention "
                       r"distribution \(its self_attn is CausalFSMN\).*--distill-side"):
        LayerTap(sanm, "decoder", -1, "--teacher-layer", "teacher t.pt", attention=True, convolution=False)
    conv_only = build_translation_model("lite_transformer_mini", encoder_embed_dim=16, decoder_embed_dim=16,
                                        encoder_branch_type=["lightweight:default:16:2"])
    with pytest.raises(DistillationSetupError, match="encoder layer 2 has no self-attention distribution"):
        LayerTap(conv_only, "encoder", -1, "--teacher-layer", "teacher", attention=True, convolution=False)
    with pytest.raises(DistillationSetupError, match="has no LSRA convolution branch.*--conv-attention-weight"):
        LayerTap(sanm, "encoder", -1, "--student-layer", "student", attention=False, convolution=True)
    with pytest.raises(DistillationSetupError, match=r"--student-layer 3 is out of range: the student encoder has 3 "
                       r"layers \(valid: -3 to 2\)"):
        LayerTap(conv_only, "encoder", 3, "--student-layer", "student", attention=False, convolution=True)


# --------------------------------------------------------------------------------------------
# The criterion with a real teacher checkpoint.
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher_checkpoint(tiny_translation_data, tmp_path_factory) -> Path:
    """A tiny LSRA teacher trained for 10 updates by fairseq-train with translation_accel."""
    save_dir = tmp_path_factory.mktemp("teacher")
    train = run_cli(["fairseq-train", tiny_translation_data, "--user-dir", USER_DIR, "--task", "translation_accel",
                     *tiny_lsra(), *TINY_TRAIN, "--max-update", "10", "--save-dir", save_dir])
    assert train.returncode == 0, cli_output(train)
    return save_dir / "checkpoint_last.pt"


def build_like_fairseq_train(data: Path, *extra: str):
    """(task, model, criterion) built the way fairseq-train builds them."""
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(
        parser, [str(data), "--user-dir", str(USER_DIR), "--task", "translation_accel", *STUDENT, *TINY_TRAIN,
                 *DISTILL, *extra])
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    return task, model, task.build_criterion(cfg.criterion)


def train_batch(task):
    task.load_dataset("train")
    iterator = task.get_batch_iterator(task.dataset("train"), max_tokens=400, seed=1).next_epoch_itr(shuffle=False)
    return next(iterator)


def test_gradients_reach_only_the_student(tiny_translation_data, teacher_checkpoint):
    assert CRITERION_REGISTRY["minilm_distillation"] is MiniLMDistillationCriterion
    task, model, criterion = build_like_fairseq_train(tiny_translation_data, "--teacher-path", str(teacher_checkpoint))
    # nothing of the teacher is a parameter, buffer or state of the criterion (what the Trainer optimizes/saves)
    assert list(criterion.parameters()) == [] and criterion.state_dict() == {}
    teacher = criterion.teacher.model
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    before = {name: p.detach().clone() for name, p in teacher.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    model.train()
    loss, sample_size, logging_output = criterion(model, train_batch(task))
    assert {"kd_loss", "at_loss", "vr_loss", "conv_at_loss"} <= set(logging_output)
    assert all(logging_output[name] > 0 for name in ("kd_loss", "at_loss", "vr_loss", "conv_at_loss"))
    loss.backward()
    optimizer.step()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(p, before[name]) for name, p in teacher.named_parameters())
    assert not teacher.training
    # each term trains the student's tapped layers, the conv term their convolution kernels
    conv_kernel = model.encoder.layers[-1].self_attn.branches[1].weight_linear.weight
    assert conv_kernel.grad is not None and conv_kernel.grad.abs().sum() > 0


def test_each_term_has_its_weight(tiny_translation_data, teacher_checkpoint):
    task, model, criterion = build_like_fairseq_train(
        tiny_translation_data, "--teacher-path", str(teacher_checkpoint), "--kd-weight", "0",
        "--attention-weight", "0", "--value-relation-weight", "0", "--conv-attention-weight", "0")
    sample = train_batch(task)
    loss, _, logging_output = criterion(model, sample)
    assert not {"kd_loss", "at_loss", "vr_loss", "conv_at_loss"} & set(logging_output)
    _, _, with_kd = build_like_fairseq_train(
        tiny_translation_data, "--teacher-path", str(teacher_checkpoint), "--kd-weight", "2",
        "--attention-weight", "0", "--value-relation-weight", "0", "--conv-attention-weight", "0")
    kd_loss, _, logging_output = with_kd(model, sample)
    assert kd_loss.item() == pytest.approx(loss.item() + 2 * logging_output["kd_loss"].item(), rel=1e-5)


def test_teacher_errors_are_one_clear_line(tiny_translation_data, teacher_checkpoint, tmp_path):
    with pytest.raises(CheckpointNotFoundError, match=r"--teacher-path .*missing.pt does not exist; .* holds"):
        build_like_fairseq_train(tiny_translation_data, "--teacher-path", str(tmp_path / "missing.pt"))
    with pytest.raises(CheckpointNotFoundError, match="--teacher-path is required"):
        build_like_fairseq_train(tiny_translation_data)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint" * 10)
    with pytest.raises(CheckpointLoadError, match=r"checkpoint .*garbage.pt \(160 bytes\) is truncated or corrupt"):
        build_like_fairseq_train(tiny_translation_data, "--teacher-path", str(garbage))  # the safe loader's check
    with pytest.raises(DistillationSetupError, match=r"--teacher-layer 2 is out of range: the teacher .* encoder has 2"):
        build_like_fairseq_train(tiny_translation_data, "--teacher-path", str(teacher_checkpoint),
                                 "--teacher-layer", "2")
    task, model, criterion = build_like_fairseq_train(
        tiny_translation_data, "--teacher-path", str(teacher_checkpoint), "--student-layer", "-2")
    with pytest.raises(DistillationSetupError, match=r"--student-layer -2 is out of range: the student encoder has 1"):
        criterion(model, train_batch(task))
    with pytest.raises(ValueError, match="--ctc-kd-weight distils the student's CTC head: it needs --ctc-weight > 0"):
        build_like_fairseq_train(tiny_translation_data, "--teacher-path", str(teacher_checkpoint), "--ctc-kd-weight", "1")
    with pytest.raises(DistillationSetupError, match=r"--ctc-kd-weight: teacher .*checkpoint_last.pt has no CTC head"):
        build_like_fairseq_train(tiny_translation_data, "--teacher-path", str(teacher_checkpoint), "--ctc-kd-weight",
                                 "1", "--ctc-weight", "0.3")
    # another dictionary: the same data with one more symbol
    other = tmp_path / "other-dict"
    shutil.copytree(tiny_translation_data, other)
    for side in ("src", "tgt"):
        with open(other / f"dict.{side}.txt", "a", encoding="utf-8") as f:
            f.write("extra 1\n")
    with pytest.raises(VocabularyMismatchError, match=r"--teacher-path .*checkpoint_last.pt: source dictionary "
                       r".*other-dict/dict.src.txt is not the one the checkpoint was trained with"):
        build_like_fairseq_train(other, "--teacher-path", str(teacher_checkpoint))


def test_fairseq_train_distils_and_saves_the_student_only(tiny_translation_data, teacher_checkpoint, tmp_path):
    """A real fairseq-train run: the terms are logged, the checkpoint holds the student alone, and
    fairseq-generate decodes it like any other."""
    teacher_bytes = teacher_checkpoint.read_bytes()
    save_dir = tmp_path / "student"
    train = run_cli(["fairseq-train", tiny_translation_data, "--user-dir", USER_DIR, "--task", "translation_accel",
                     *STUDENT, *TINY_TRAIN, *DISTILL, "--teacher-path", teacher_checkpoint, "--max-update", "6",
                     "--save-dir", save_dir, "--log-format", "simple", "--log-interval", "1"])
    assert train.returncode == 0, cli_output(train)
    log = train.stdout + train.stderr
    for term in ("kd_loss", "at_loss", "vr_loss", "conv_at_loss"):
        assert f"| {term} " in log, log[-3000:]
    for side in ("encoder: teacher layer 1 -> student layer 0", "decoder: teacher layer 1 -> student layer 0"):
        assert f"minilm_distillation, {side}, teacher 2 / student 2 heads: MiniLM per-head" in log
    state = read_checkpoint(str(save_dir / "checkpoint_last.pt"))
    assert state["criterion"] is None and state["cfg"]["criterion"]["_name"] == "minilm_distillation"
    student, _ = build_like_fairseq_train(tiny_translation_data, "--teacher-path", str(teacher_checkpoint))[1:]
    assert set(state["model"]) == set(student.state_dict())  # the student's keys, none of the teacher's
    assert teacher_checkpoint.read_bytes() == teacher_bytes
    generate = run_cli(["fairseq-generate", tiny_translation_data, "--user-dir", USER_DIR, "--task", "translation_accel",
                        "--path", save_dir / "checkpoint_last.pt", "--beam", "2", "--batch-size", "16", "--cpu"])
    assert generate.returncode == 0, cli_output(generate)
