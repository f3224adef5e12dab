"""Compression fine-tuning inside fairseq-train (fairseq_accel/compression/): progressive sparsity with
weight importance, its patterns and scope, ADMM weight quantization, checkpoint state and bad options."""
import re
from pathlib import Path
from typing import Dict, List, Sequence

import pytest
import torch
from fairseq import checkpoint_utils

import fairseq_accel.plugin  # noqa: F401  (registers the tasks; checkpoint loading)
from conftest import TINY_TRAIN, TINY_TRANSFORMER, USER_DIR, cli_output, run_cli
from distributed_ranks import train_on_two_ranks
from fairseq_accel.compression.config import CompressionTrainingConfig, check_compression_options
from fairseq_accel.compression.errors import CompressionOptionError
from fairseq_accel.compression.quantization_grid import project_to_grid
from fairseq_accel.compression import COMPRESSION_KEY

TRAIN = ["--user-dir", USER_DIR, "--task", "translation_accel", *TINY_TRANSFORMER, *TINY_TRAIN]
PRUNE = ["--sparsity-end-update", "6", "--sparsity-frequency", "2", "--max-update", "8"]


def train(data: Path, save_dir: Path, *options: str) -> str:
    result = run_cli(["fairseq-train", data, *TRAIN, "--save-dir", save_dir, "--log-interval", "1", *options])
    assert result.returncode == 0, cli_output(result)
    return result.stdout + result.stderr


def refusal(data: Path, tmp_path: Path, *options: str) -> str:
    """The last stderr line of a fairseq-train run that must stop with a compression error."""
    result = run_cli(["fairseq-train", data, *TRAIN, "--save-dir", tmp_path / "refused", "--max-update", "2",
                      *options])
    assert result.returncode != 0, cli_output(result)
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("fairseq_accel.compression.errors.Compression"), cli_output(result)
    return last


def saved(save_dir: Path) -> Dict:
    return checkpoint_utils.load_checkpoint_to_cpu(str(save_dir / "checkpoint_last.pt"))


def masks_of(state: Dict) -> Dict[str, torch.Tensor]:
    return state["task_state"][COMPRESSION_KEY]["sparsity"]["masks"]


@pytest.mark.parametrize("pattern, target, threshold", [
    ("unstructured", 0.7, "layer"), ("unstructured", 0.6, "global"), ("2:4", 0.5, "layer"), ("row", 0.5, "layer"),
])
def test_sparsity_reaches_the_target_in_its_pattern(tiny_translation_data: Path, tmp_path: Path, pattern: str,
                                                   target: float, threshold: str) -> None:
    log = train(tiny_translation_data, tmp_path, *PRUNE, "--sparsity-target", str(target),
                "--sparsity-pattern", pattern, "--sparsity-threshold", threshold)
    state = saved(tmp_path)
    masks = masks_of(state)
    assert len(masks) == 16  # every nn.Linear weight of the 1+1-layer transformer, no embedding
    assert all("embed" not in name for name in masks)
    embeddings = state["model"]["encoder.embed_tokens.weight"]
    assert not (embeddings[torch.arange(len(embeddings)) != 1] == 0).any()  # only fairseq's padding row (index 1)
    zeros = total = 0
    for name, mask in masks.items():
        weight = state["model"][name]
        assert torch.equal(weight != 0, mask), name  # the saved weights are the masked ones
        zeros, total = zeros + int((~mask).sum()), total + mask.numel()
        if threshold == "layer":
            assert abs((~mask).float().mean().item() - target) <= 0.005, name
        if pattern == "2:4":
            assert torch.all(mask.view(-1, 4).sum(dim=1) == 2), name
        if pattern == "row":
            assert torch.all(mask.all(dim=1) | ~mask.any(dim=1)), name
    assert abs(zeros / total - target) <= 0.005
    layer_sparsities = {round((~m).float().mean().item(), 3) for m in masks.values()}
    assert (len(layer_sparsities) > 1) == (threshold == "global"), layer_sparsities
    logged = [float(v) for v in re.findall(r"sparsity=([0-9.]+)", log)]
    if pattern != "row":  # (rows: coarser steps) Zhu & Gupta's s(t) = S (1 - (1 - t/6)^3), masks at t = 2, 4, 6
        at = [0] + [target * (1 - (1 - t / 6) ** 3) for t in (2, 2, 4, 4, 6, 6, 6)]
        assert logged == pytest.approx(at, abs=0.003), logged
    assert logged[-1] == pytest.approx(target, abs=0.005)
    assert re.search(r"sparsity reached at update 6:\n.*fc2\.weight", log, re.S), log[-3000:]


def test_restore_continues_masks_and_importance_exactly(tiny_translation_data: Path, tmp_path: Path) -> None:
    """Interrupted at update 5 (between the mask updates at 3 and 6, taylor sums half accumulated) and resumed
    with --restore-file: masks, weights and losses equal those of the uninterrupted run. One batch per epoch:
    stock fairseq builds other batches when it resumes inside an epoch, which would hide what is tested here."""
    options = ["--sparsity-target", "0.6", "--sparsity-end-update", "9", "--sparsity-frequency", "3",
               "--sparsity-importance", "taylor", "--max-tokens", "20000", "--required-batch-size-multiple", "1"]
    straight_log = train(tiny_translation_data, tmp_path / "straight", *options, "--max-update", "10")
    train(tiny_translation_data, tmp_path / "resumed", *options, "--max-update", "5")
    interrupted = saved(tmp_path / "resumed")["task_state"][COMPRESSION_KEY]["sparsity"]
    assert any(value.any() for value in interrupted["taylor"].values())  # sums of updates 4 and 5 are in it
    resumed_log = train(tiny_translation_data, tmp_path / "resumed", *options, "--max-update", "10",
                        "--restore-file", tmp_path / "resumed" / "checkpoint_last.pt")
    straight, resumed = saved(tmp_path / "straight"), saved(tmp_path / "resumed")
    assert any(not torch.equal(interrupted["masks"][n], m) for n, m in masks_of(straight).items())  # moved after 5
    for name, mask in masks_of(straight).items():
        assert torch.equal(mask, masks_of(resumed)[name]), name
    for name, weight in straight["model"].items():  # equal up to float reduction order across processes
        assert torch.allclose(weight, resumed["model"][name], rtol=0, atol=1e-5), name
    losses = re.compile(r"loss=([0-9.]+).*num_updates=(\d+)")
    assert losses.findall(straight_log)[5:] == losses.findall(resumed_log)


def test_two_ranks_hold_the_same_masks_importance_and_weights(tiny_translation_data: Path, tmp_path: Path) -> None:
    """fairseq's own --distributed-world-size 2 (gloo on CPU): every rank ends with the same masks (updated
    at 3 and 6), taylor importance sums (all-reduced; update 7's are pending) and weights."""
    rank0, rank1 = train_on_two_ranks(
        [tiny_translation_data, *TRAIN, "--save-dir", tmp_path / "checkpoints", "--sparsity-target", "0.5",
         "--sparsity-end-update", "8", "--sparsity-frequency", "3", "--sparsity-importance", "taylor",
         "--sparsity-threshold", "global", "--max-update", "7"], tmp_path / "ranks")
    states = [rank["task"][COMPRESSION_KEY]["sparsity"] for rank in (rank0, rank1)]
    reached = sum(int((~m).sum()) for m in states[0]["masks"].values()) / sum(m.numel() for m in states[0]["masks"].values())
    assert abs(reached - 0.5 * (1 - (1 - 6 / 8) ** 3)) <= 0.005, reached  # the cubic schedule at update 6
    for name in states[0]["masks"]:
        assert torch.equal(states[0]["masks"][name], states[1]["masks"][name]), name
        assert torch.equal(states[0]["taylor"][name], states[1]["taylor"][name]), name
        assert states[0]["taylor"][name].any(), name  # update 7 was accumulated after the last mask update
    for name, weight in rank0["model"].items():
        assert torch.equal(weight, rank1["model"][name]), name
    assert masks_of(saved(tmp_path / "checkpoints")).keys() == states[0]["masks"].keys()


def logged_distances(log: str) -> List[float]:
    return [float(v) for v in re.findall(r"admm_distance=([0-9.e-]+)", log)]


def test_admm_finalized_weights_lie_on_the_grid_and_pruned_weights_stay_zero(tiny_translation_data: Path,
                                                                            tmp_path: Path) -> None:
    log = train(tiny_translation_data, tmp_path, *PRUNE, "--sparsity-target", "0.5", "--admm-bits", "4",
                "--admm-rho", "0.05", "--admm-update-frequency", "2", "--admm-finalize-update", "7")
    state = saved(tmp_path)
    for name, mask in masks_of(state).items():
        weight = state["model"][name]
        assert torch.equal(project_to_grid(weight, 4), weight), name
        assert torch.equal(weight != 0, mask), name  # on the grid, and pruned weights stayed zero
        levels = weight / (weight.abs().amax(dim=1, keepdim=True).clamp_min(1e-30) / 7)  # int4: levels -7..7
        assert torch.allclose(levels, levels.round(), atol=1e-4), name
    assert len(logged_distances(log)) == 8
    grid = state["task_state"][COMPRESSION_KEY]["admm"]["grid"]
    assert set(grid) == set(masks_of(state))


def test_admm_penalty_pulls_the_weights_to_the_grid(tiny_translation_data: Path, tmp_path: Path) -> None:
    """||W - Z|| / ||W|| falls under a strong rho and stays where it was under a weak one (same data and seed;
    plain SGD, whose step follows the penalty's gradient; Adam's per-weight normalisation needs more updates)."""
    common = ["--admm-bits", "4", "--admm-update-frequency", "2", "--max-update", "10", "--optimizer", "sgd",
              "--lr", "0.5", "--lr-scheduler", "fixed", "--warmup-updates", "0"]
    weak = logged_distances(train(tiny_translation_data, tmp_path / "weak", *common, "--admm-rho", "1e-4"))
    strong = logged_distances(train(tiny_translation_data, tmp_path / "strong", *common, "--admm-rho", "1"))
    assert strong[-1] < 0.5 * strong[0], strong
    assert strong[-1] < 0.5 * weak[-1], (weak, strong)


#: (fairseq-train options, the one-line error); the first group is decided from the options alone, the
#: second needs the model (checked when the task builds it).
BAD_OPTIONS = [
    ({"sparsity_target": 1.0}, "--sparsity-target must be in [0, 1), got 1.0"),
    ({"sparsity_target": 0.5, "sparsity_start_update": 4, "sparsity_end_update": 4},
     "--sparsity-end-update (4) must be greater than --sparsity-start-update (4)"),
    ({"sparsity_target": 0.7, "sparsity_pattern": "2:4", "sparsity_end_update": 4},
     "a target of 0.7 cannot be reached with it (use 0.5)"),
    ({"sparsity_pattern": "4:2"}, "--sparsity-pattern must be unstructured, row or N:M with 0 < N < M"),
    ({"sparsity_target": 0.5, "sparsity_end_update": 4, "sparsity_override": "fc1"},
     "--sparsity-override 'fc1': expected REGEX=S with 0 <= S < 1"),
    ({"admm_bits": 6}, "--admm-bits must be one of 8, 4 (or 0: off), got 6"),
    ({"admm_rho": 0.1}, "--admm-rho would be ignored: add --admm-bits 8 or 4"),
    ({"sparsity_pattern": "row"}, "--sparsity-pattern would be ignored: add --sparsity-target"),
    ({"compress_embeddings": True}, "--compress-embeddings would be ignored: add --sparsity-target or --admm-bits"),
]
BAD_FOR_THE_MODEL = [
    (["--sparsity-target", "0.3333333", "--sparsity-pattern", "2:3", "--sparsity-end-update", "4"],
     "encoder.layers.0.self_attn.k_proj.weight has 16 inputs (shape (16, 16)), not a multiple of 3"),
    (["--sparsity-target", "0.5", "--sparsity-end-update", "4", "--sparsity-override", r"decoder\.layers\.7=0.2"],
     r"'decoder\\.layers\\.7' matches no compressible weight"),
]


def command_line(options: Dict) -> List[str]:
    flags = []
    for name, value in options.items():
        flags += [f"--{name.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return flags


@pytest.mark.parametrize("options, message", BAD_OPTIONS)
def test_bad_compression_options_are_refused(options: Dict, message: str) -> None:
    with pytest.raises(CompressionOptionError) as refused:
        check_compression_options(CompressionTrainingConfig(**options))
    assert message in str(refused.value)


def test_fairseq_train_stops_on_a_bad_option_with_one_line(tiny_translation_data: Path, tmp_path: Path) -> None:
    options, message = BAD_OPTIONS[0]
    assert message in refusal(tiny_translation_data, tmp_path, *command_line(options))


@pytest.mark.parametrize("options, message", BAD_FOR_THE_MODEL)
def test_options_that_do_not_fit_the_model_stop_fairseq_train(tiny_translation_data: Path, tmp_path: Path,
                                                              options: Sequence[str], message: str) -> None:
    assert message in refusal(tiny_translation_data, tmp_path, *options)


def test_resuming_with_another_scope_is_refused(tiny_translation_data: Path, tmp_path: Path) -> None:
    train(tiny_translation_data, tmp_path, *PRUNE, "--sparsity-target", "0.5")
    line = refusal(tiny_translation_data, tmp_path, *PRUNE, "--sparsity-target", "0.5", "--compress-embeddings",
                   "--restore-file", tmp_path / "checkpoint_last.pt")
    assert "sparsity masks in" in line and "--compress-" in line, line


def test_pruned_checkpoint_decodes_with_fairseq_generate(tiny_translation_data: Path, tmp_path: Path) -> None:
    train(tiny_translation_data, tmp_path, *PRUNE, "--sparsity-target", "0.5")
    result = run_cli(["fairseq-generate", tiny_translation_data, "--user-dir", USER_DIR, "--task",
                      "translation_accel", "--path", tmp_path / "checkpoint_last.pt", "--beam", "2",
                      "--max-len-b", "5", "--cpu", "--batch-size", "8"])
    assert result.returncode == 0, cli_output(result)
    assert sum(line.startswith("H-") for line in result.stdout.splitlines()) == 40
