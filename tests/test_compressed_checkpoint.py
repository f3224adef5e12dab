"""The compressed checkpoint (fairseq_accel/compression/compressed_format.py) and fairseq-accel-compress: packing
round trips, masks only where they pay, tied tensors stored once, decoding through fairseq-generate with the
same hypotheses as the float model on the int8 grid, and one-line errors."""
from pathlib import Path
from typing import List

import pytest
import torch

from conftest import TINY_TRAIN, USER_DIR, cli_output, run_cli, tiny_lsra
from fairseq_accel.cli.compress import main as compress_main
from fairseq_accel.compat.checkpoint_files import COMPRESSED_KEY
from fairseq_accel.compat.checkpoint_loading import read_checkpoint
from fairseq_accel.compression.compressed_format import pack, size_rows
from fairseq_accel.compression.quantization_grid import project_to_grid, quantize_to_levels


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_pack_round_trip(bits: int, sparsity: float) -> None:
    generator = torch.Generator().manual_seed(bits)
    weight = torch.randn(7, 9, generator=generator)  # 63 weights: an odd count of int4 nibbles
    weight[torch.rand(7, 9, generator=generator) < sparsity] = 0.0
    packed = pack(weight, bits)
    levels, scales = quantize_to_levels(weight, bits)
    assert torch.equal(packed.levels(), levels)
    assert torch.equal(packed.dequantize(), levels.float() * scales)
    nonzero = int((levels != 0).sum())
    masked = nonzero * bits / 8 + 63 / 8 < 63 * bits / 8  # the mask is kept only where it makes the tensor smaller
    assert (packed.mask is not None) == masked and (sparsity > 0) == masked
    value_bytes = (nonzero if masked else 63) * bits / 8
    assert packed.nbytes == -(-value_bytes // 1) + (-(-63 // 8) if masked else 0) + 7 * 4


def test_weights_on_the_grid_are_stored_losslessly() -> None:
    """ADMM-finalized weights (already on their per-row int8 grid) keep their exact levels."""
    on_grid = project_to_grid(torch.randn(16, 12), 8)
    packed = pack(on_grid, 8)
    assert torch.equal(packed.levels(), quantize_to_levels(on_grid, 8)[0])
    assert torch.allclose(packed.dequantize(), on_grid, rtol=1e-6, atol=0)


@pytest.fixture(scope="module")
def pruned_lsra(tiny_translation_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LSRA (shared embeddings) fine-tuned to 50 % sparsity: its last checkpoint."""
    save_dir = tmp_path_factory.mktemp("compress") / "checkpoints"
    result = run_cli(["fairseq-train", tiny_translation_data, "--user-dir", USER_DIR, "--task", "translation_accel",
                      *tiny_lsra(), *TINY_TRAIN, "--max-update", "30", "--sparsity-target", "0.5",
                      "--sparsity-end-update", "20", "--sparsity-frequency", "5", "--save-dir", save_dir])
    assert result.returncode == 0, cli_output(result)
    return save_dir / "checkpoint_last.pt"


@pytest.fixture(scope="module")
def compressed(pruned_lsra: Path) -> "tuple[Path, str]":
    """fairseq-accel-compress of ``pruned_lsra``: the compressed checkpoint and what the command printed."""
    output = pruned_lsra.parent.parent / "compressed.pt"
    result = run_cli(["fairseq-accel-compress", "--path", pruned_lsra, "--out", output])
    assert result.returncode == 0, cli_output(result)
    return output, result.stdout


def hypotheses(data: Path, checkpoint: Path, *extra: str) -> List[str]:
    result = run_cli(["fairseq-generate", data, "--path", checkpoint, "--gen-subset", "test", "--beam", "3", "--cpu",
                      "--batch-size", "16", *extra])
    assert result.returncode == 0, cli_output(result)
    return sorted(line for line in result.stdout.splitlines() if line.startswith("H-"))


def test_compressed_checkpoint_decodes_like_the_model_on_its_grid(pruned_lsra: Path, compressed: "tuple[Path, str]",
                                                                  tiny_translation_data: Path, tmp_path: Path) -> None:
    compressed, printed = compressed
    state = read_checkpoint(str(compressed))
    section = state[COMPRESSED_KEY]
    assert "model" not in state and "last_optimizer_state" not in state
    # share_all_embeddings: one stored embedding, the other two names are aliases of it
    assert section["aliases"] == {"decoder.embed_tokens.weight": "encoder.embed_tokens.weight",
                                  "decoder.output_projection.weight": "encoder.embed_tokens.weight"}
    rows = {row.name: row for row in size_rows(section)}
    assert rows["encoder.layers.0.fc1.weight"].storage == "int8+mask"  # pruned to 50 %: mask + non-zeros
    assert rows["encoder.embed_tokens.weight"].storage == "int8"  # embeddings are dense: no mask
    fp32 = sum(row.fp32_nbytes for row in rows.values())
    stored = sum(row.nbytes for row in rows.values())
    assert f"fp32 {fp32:,} bytes: {fp32 / stored:.2f}x smaller" in printed
    assert fp32 / stored > 3.5

    # the float model projected onto the same per-row grids, as a plain fairseq checkpoint
    original = read_checkpoint(str(pruned_lsra))
    original["model"] = {name: project_to_grid(tensor, 8) if tensor.dim() == 2 else tensor
                         for name, tensor in original["model"].items()}
    projected = tmp_path / "projected.pt"
    torch.save(original, projected)
    with_plugin = ("--user-dir", str(USER_DIR))
    decoded = hypotheses(tiny_translation_data, compressed, *with_plugin)
    assert len(decoded) == 40 and decoded == hypotheses(tiny_translation_data, projected, *with_plugin)

    inspected = run_cli(["fairseq-accel-compress", "--inspect", compressed, "--top", "3"])
    assert inspected.returncode == 0, cli_output(inspected)
    assert inspected.stdout.splitlines()[-1] == printed.splitlines()[-2]  # the same totals line


def last_error_line(result) -> str:
    assert result.returncode != 0, cli_output(result)
    return result.stderr.strip().splitlines()[-1]


def refused(capsys: pytest.CaptureFixture, *args: object) -> str:
    """The one stderr line of fairseq-accel-compress (its main, in this process) that must fail."""
    capsys.readouterr()
    assert compress_main([str(arg) for arg in args]) == 2
    return capsys.readouterr().err.strip()


def test_bad_inputs_are_one_line(pruned_lsra: Path, compressed: "tuple[Path, str]", tiny_translation_data: Path,
                                 tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    compressed = compressed[0]
    assert refused(capsys, "--path", compressed, "--out", tmp_path / "twice.pt") == (
        f"fairseq-accel-compress: error: {compressed} is already compressed; compress the original checkpoint instead")
    assert "is not a compressed checkpoint" in refused(capsys, "--inspect", pruned_lsra)

    state = read_checkpoint(str(compressed))
    state[COMPRESSED_KEY]["version"] = 99
    future = tmp_path / "future.pt"
    torch.save(state, future)
    expected = "compressed checkpoint format version 99; this fairseq_accel reads version 1"
    assert expected in refused(capsys, "--inspect", future)
    generated = run_cli(["fairseq-generate", tiny_translation_data, "--user-dir", USER_DIR, "--path", future,
                         "--gen-subset", "test", "--cpu"])
    assert expected in last_error_line(generated)
    without_plugin = run_cli(["fairseq-generate", tiny_translation_data, "--path", compressed, "--gen-subset", "test",
                              "--cpu"])
    assert "is a compressed checkpoint (fairseq-accel-compress); load it with the plugin" in last_error_line(
        without_plugin)
