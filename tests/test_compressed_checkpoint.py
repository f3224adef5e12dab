"""The compressed checkpoint (fairseq_accel/compression/compressed_format.py) and fairseq-accel-compress: packing
round trips, masks only where they pay, tied tensors stored once, decoding through fairseq-generate with the
same hypotheses as the float model on the int8 grid; activation calibration (resumed, sharded and merged) and
int8 execution with both generators; and one-line errors."""
import re
from pathlib import Path
from typing import List

import jiwer
import numpy as np
import pytest
import torch
from fairseq import checkpoint_utils
from fairseq.data.indexed_dataset import make_builder
from fairseq.sequence_generator import SequenceGenerator

from conftest import TINY_TRAIN, USER_DIR, cli_output, run_cli, tiny_lsra
import fairseq_accel.plugin  # noqa: F401  (registers the plugin, installs its fairseq patches)
from fairseq_accel.cli.compress import main as compress_main
from fairseq_accel.compat.checkpoint_files import COMPRESSED_KEY
from fairseq_accel.compat.checkpoint_loading import read_checkpoint
from fairseq_accel.compression.activation_calibration import LinearInputCalibrator, calibration_batches
from fairseq_accel.compression.compressed_format import OUTPUT_RANGES_ROW, pack, size_rows, storage_aliases
from fairseq_accel.compression.ranking_calibration import SAMPLE_SENTENCES, SentenceSample
from fairseq_accel.compression.quantization_grid import project_to_grid, quantize_to_levels
from fairseq_accel.compression.sensitivity_measures import sensitivity_measure
from fairseq_accel.compression.similarity_calibration import SAMPLE_ROWS
from fairseq_accel.modules.int8_linear import activation_max_level


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


def test_tied_tensors_are_stored_once_whether_shared_or_copied() -> None:
    """Tied embeddings share storage in a trained checkpoint and are separate equal copies in an averaged one
    (fairseq's average_checkpoints.py): both are stored once; equal small tensors (norms at 1) are not tied."""
    embedding = torch.randn(100, 64)
    state = {"encoder.embed_tokens.weight": embedding, "decoder.embed_tokens.weight": embedding,
             "decoder.output_projection.weight": embedding.clone(), "other.weight": torch.randn(100, 64),
             "a.norm.weight": torch.ones(64), "b.norm.weight": torch.ones(64)}
    assert storage_aliases(state) == {"decoder.embed_tokens.weight": "encoder.embed_tokens.weight",
                                      "decoder.output_projection.weight": "encoder.embed_tokens.weight"}


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
    # the stock task decodes it in float32, and says once which task runs the int8 layers
    stock_task = run_cli(["fairseq-generate", tiny_translation_data, "--path", compressed, "--gen-subset", "test",
                          "--cpu", "--max-sentences", "4", *with_plugin])
    notices = [line for line in stock_task.stderr.splitlines() if "under the stock task" in line]
    assert stock_task.returncode == 0 and len(notices) == 1, cli_output(stock_task)
    assert notices[0].endswith("a compressed checkpoint (fairseq-accel-compress) under the stock task TranslationTask: "
                               "its weights run expanded to float32; --task translation_accel (speech: "
                               "speech_to_text_accel) runs its int8 layers")

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


# --- activation calibration and int8 execution --------------------------------------------------------------

CALIBRATE = ("--calib-batches", "2", "--max-tokens", "60")  # the toy valid set holds 5+ such batches


@pytest.fixture(scope="module")
def calibrated(pruned_lsra: Path, tiny_translation_data: Path) -> "tuple[Path, str]":
    """``pruned_lsra`` compressed with calibrated activations (2 valid batches, resumable state beside it)."""
    output = pruned_lsra.parent.parent / "calibrated.pt"
    result = run_cli(["fairseq-accel-compress", "--path", pruned_lsra, "--data", tiny_translation_data, *CALIBRATE,
                      "--calib-state", output.with_suffix(".calib"), "--out", output])
    assert result.returncode == 0, cli_output(result)
    return output, result.stdout


def int8_layer_count(log: str) -> int:
    counts = re.findall(r"--compressed-exec int8: (\d+) linear layers run as int8 GEMMs", log)
    assert len(counts) == 1, log[-2000:]
    return int(counts[0])


def test_calibrated_checkpoint_decodes_in_int8_with_both_generators(
        calibrated: "tuple[Path, str]", compressed: "tuple[Path, str]", tiny_translation_data: Path) -> None:
    path, printed = calibrated
    activations = read_checkpoint(str(path))[COMPRESSED_KEY]["activations"]
    assert activations["method"] == "mse" and activations["batches"] == 2 and activations["subset"] == "valid"
    # the FFN's second layer reads a ReLU output: unsigned levels; the first reads a layer norm: signed
    assert activations["zero_points"]["encoder.layers.0.fc2.weight"] == 0
    assert activations["zero_points"]["encoder.layers.0.fc1.weight"] == 64
    calibrated_layers = len(activations["scales"])
    assert f"activations: {calibrated_layers} linear layers calibrated (mse, 2 batches of valid)" in printed

    accel = ("--user-dir", str(USER_DIR), "--task", "translation_accel")
    runs = {}
    every_layer = ("--int8-min-weights", "0")  # the toy model's layers are far below the default floor
    for name, extra in (("fast", ("--accel-generator", "fast")), ("stock", ())):
        result = run_cli(["fairseq-generate", tiny_translation_data, "--path", path, "--gen-subset", "test", "--beam",
                          "3", "--cpu", "--batch-size", "16", *accel, *every_layer, *extra])
        assert result.returncode == 0, cli_output(result)
        # every linear layer, the tied output projection included (shared layers counted where they are used)
        assert int8_layer_count(result.stderr) >= calibrated_layers and "under the stock task" not in result.stderr
        runs[name] = sorted(line for line in result.stdout.splitlines() if line.startswith("H-"))
    assert len(runs["fast"]) == 40 and runs["fast"] == runs["stock"]

    # the int8 attention path: the decoder's attention projections have calibrated output ranges, so their
    # keys/values go into int8 self- and cross-attention caches as the int8 GEMM's output levels
    attentions = {name.rsplit(".", 2)[0] for name in activations["output_absmax"]}
    assert attentions and all(re.fullmatch(r"decoder\.layers\.\d+\.(self_attn\.branches\.\d+|encoder_attn)", a)
                              for a in attentions), attentions
    projections = {a: {n.split(".")[-2] for n in activations["output_absmax"] if n.startswith(a + ".")}
                   for a in attentions}  # self-attention: one fused query/key/value GEMM; cross: keys, values
    assert all(p == ({"k_proj", "v_proj"} if a.endswith("encoder_attn") else {"q_proj", "k_proj", "v_proj"})
               for a, p in projections.items()), projections
    section = read_checkpoint(str(path))[COMPRESSED_KEY]
    ranges_row = next(row for row in size_rows(section) if row.name == OUTPUT_RANGES_ROW)  # counted in the size
    assert ranges_row.nbytes == 2 * sum(r.numel() for r in activations["output_absmax"].values()) > 0
    result = run_cli(["fairseq-generate", tiny_translation_data, "--path", path, "--gen-subset", "test", "--beam", "3",
                      "--cpu", "--batch-size", "16", *accel, *every_layer, "--accel-generator", "fast",
                      "--kv-cache-dtype", "int8", "--quantize-cross-kv"])
    assert result.returncode == 0, cli_output(result)
    assert f"int8 attention path: {len(attentions)} attention layers write int8 keys/values" in result.stderr
    on_levels = sorted(line for line in result.stdout.splitlines() if line.startswith("H-"))
    same = sum(a.split("\t")[-1] == b.split("\t")[-1] for a, b in zip(on_levels, runs["fast"]))
    assert len(on_levels) == 40 and same >= 30, f"int8 keys/values changed {40 - same} of 40 hypotheses"

    as_float = hypotheses(tiny_translation_data, path, *accel, "--compressed-exec", "float")
    assert as_float == hypotheses(tiny_translation_data, compressed[0], *accel)  # the weights-only decode
    same = sum(a.split("\t")[-1] == b.split("\t")[-1] for a, b in zip(runs["stock"], as_float))
    assert same >= 30, f"int8 activations changed {40 - same} of 40 hypotheses"


def calibration_section(capsys: pytest.CaptureFixture, *args: object) -> "tuple[dict, str]":
    """Run fairseq-accel-compress in this process: the activation record of what it wrote, and its stderr."""
    capsys.readouterr()
    status = compress_main([str(arg) for arg in args])
    stderr = capsys.readouterr().err
    assert status == 0, stderr
    out = Path(str(args[args.index("--out") + 1]))
    return read_checkpoint(str(out))[COMPRESSED_KEY]["activations"], stderr


def test_calibration_resumes_and_merges_across_shards(pruned_lsra: Path, calibrated: "tuple[Path, str]",
                                                      tiny_translation_data: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    common = ("--path", pruned_lsra, "--data", tiny_translation_data, "--max-tokens", "60")
    state = tmp_path / "resumed.calib"
    state.write_bytes(calibrated[0].with_suffix(".calib").read_bytes())  # the fixture's run: 2 batches
    resumed, stderr = calibration_section(capsys, *common, "--calib-batches", "4", "--calib-state", state,
                                          "--out", tmp_path / "resumed.pt")
    assert f"resuming the calibration in {state} after 2 batches" in stderr
    fresh, _ = calibration_section(capsys, *common, "--calib-batches", "4", "--out", tmp_path / "fresh.pt")
    assert resumed["batches"] == fresh["batches"] == 4
    assert resumed["scales"] == fresh["scales"] and resumed["zero_points"] == fresh["zero_points"]
    assert resumed["output_absmax"].keys() == fresh["output_absmax"].keys()
    assert all(torch.equal(resumed["output_absmax"][k], fresh["output_absmax"][k]) for k in fresh["output_absmax"])

    parts = [tmp_path / f"part{k}.calib" for k in range(2)]
    for k, part in enumerate(parts):
        capsys.readouterr()
        assert compress_main([str(a) for a in (*common, "--calib-batches", "2", "--calib-shard", f"{k}/2",
                                               "--calib-state", part)]) == 0
        assert f"calibrated shard {k}/2: 2 batches in {part}" in capsys.readouterr().out
    merged, _ = calibration_section(capsys, "--path", pruned_lsra, "--calib-from", *parts, "--out", tmp_path / "m.pt")
    assert merged["batches"] == 4
    shard_states = [read_checkpoint(str(part)) for part in parts]
    merged_state = LinearInputCalibrator(shard_states[0]["histograms"], shard_states[0]["output_absmax"])
    for part, shard in zip(parts, shard_states):
        merged_state.load_state_dict(shard, str(part))
    for name in ("encoder.layers.0.fc1", "decoder.output_projection"):
        counts = sum(int(np.asarray(shard["histograms"][name]["counts"]).sum()) for shard in shard_states)
        assert merged_state.histograms[name].total == counts > 0  # nothing lost in the merge
    for name, absmax in merged_state.output_absmax.items():  # output ranges merge as the larger of the two
        assert torch.equal(absmax, torch.maximum(*(shard["output_absmax"][name] for shard in shard_states)))


@pytest.mark.parametrize("method", ["pearson", "ranking"])
def test_similarity_aware_calibration(pruned_lsra: Path, calibrated: "tuple[Path, str]", tiny_translation_data: Path,
                                      tmp_path: Path, capsys: pytest.CaptureFixture, method: str) -> None:
    """--act-calib pearson (ranking), calibrated in two shards and merged: ranges chosen on the sampled input rows
    (and attention sentences), never beyond the largest input calibration saw; a sampled state cannot be resumed
    by another method."""
    common = ("--path", pruned_lsra, "--data", tiny_translation_data, *CALIBRATE)
    parts = [tmp_path / f"part{k}.calib" for k in range(2)]
    for k, part in enumerate(parts):
        assert compress_main([str(a) for a in (*common, "--act-calib", method, "--calib-shard", f"{k}/2",
                                               "--calib-state", part)]) == 0
    merged = tmp_path / "merged.pt"
    similar, _ = calibration_section(capsys, "--path", pruned_lsra, "--calib-from", *parts, "--act-calib", method,
                                     "--out", merged)
    assert similar["method"] == method and similar["batches"] == 4
    states = [read_checkpoint(str(part)) for part in parts]
    seen = LinearInputCalibrator(states[0]["histograms"], states[0]["output_absmax"], SAMPLE_ROWS,
                                 {name: SentenceSample.from_state_dict(s).layout
                                  for name, s in states[0]["sentences"].items()})
    for part, state in zip(parts, states):
        seen.load_state_dict(state, str(part))
    if method == "ranking":  # every attention of the LSRA (encoder and decoder branches, cross) kept sentences
        assert {name.rsplit(".", 1)[0] for name in seen.histograms if name.endswith(".q_proj")} == set(seen.sentences)
        assert all(0 < len(sample.queries) <= SAMPLE_SENTENCES for sample in seen.sentences.values())
    largest = {f"{name}.weight": float(sample.rows.abs().max()) for name, sample in seen.samples.items()}
    levels = {name: activation_max_level(zero) for name, zero in similar["zero_points"].items()}
    checked = similar["scales"].keys() & largest.keys()  # (the tied output projection is stored as the embedding)
    assert len(checked) == len(similar["scales"]) - 1
    assert all(0 < similar["scales"][name] * levels[name] <= largest[name] * (1 + 1e-6) for name in checked)
    other = refused_after_progress(capsys, *common, "--act-calib", "mse", "--calib-state", parts[0], "--out",
                                   tmp_path / "other.pt")
    assert "holds the calibration of" in other and "'sampled_rows': 512" in other


def refused_after_progress(capsys: pytest.CaptureFixture, *args: object) -> str:
    """The error line that ends a failing run's stderr (after the calibration progress bar, if any)."""
    return refused(capsys, *args).splitlines()[-1]


def test_calibration_errors_are_one_line(pruned_lsra: Path, calibrated: "tuple[Path, str]",
                                         tiny_translation_data: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    common = ("--data", tiny_translation_data, *CALIBRATE, "--out", tmp_path / "out.pt")
    # NaN activations: the first layer that reads them is named
    state = read_checkpoint(str(pruned_lsra))
    state["model"]["encoder.layers.0.fc1.weight"][0, 0] = float("nan")
    broken = tmp_path / "nan.pt"
    torch.save(state, broken)
    assert re.fullmatch(r"fairseq-accel-compress: error: encoder\.layers\.0\.fc2: \d+ NaN or infinite activation "
                        r"values in a calibration batch; check the model and the input features",
                        refused_after_progress(capsys, "--path", broken, *common))

    # an empty calibration subset
    empty = tmp_path / "empty-data"
    empty.mkdir()
    for source in tiny_translation_data.iterdir():
        (empty / source.name).symlink_to(source)
    for lang in ("src", "tgt"):
        for suffix in (".bin", ".idx"):
            (empty / f"valid.src-tgt.{lang}{suffix}").unlink()
        builder = make_builder(str(empty / f"valid.src-tgt.{lang}.bin"), impl="mmap", vocab_size=100)
        builder.finalize(str(empty / f"valid.src-tgt.{lang}.idx"))
    assert refused_after_progress(capsys, "--path", pruned_lsra, "--data", empty, *CALIBRATE, "--out",
                                  tmp_path / "out.pt") == ("fairseq-accel-compress: error: calibration subset 'valid' "
                                                           "cannot be loaded: cannot mmap an empty file")
    # a shard without batches (the toy valid set has fewer than 50)
    assert "the calibration set is empty: no batch ran through the model" in refused_after_progress(
        capsys, "--path", pruned_lsra, "--data", tiny_translation_data, "--max-tokens", "60", "--calib-shard", "49/50",
        "--calib-state", tmp_path / "shard.calib")

    # a layer without calibration data that the options keep in int8
    part = read_checkpoint(str(calibrated[0].with_suffix(".calib")))
    part["histograms"]["decoder.layers.0.fc1"]["counts"].zero_()
    lacking = tmp_path / "lacking.calib"
    torch.save(part, lacking)
    message = refused_after_progress(capsys, "--path", pruned_lsra, "--calib-from", lacking, "--out", tmp_path / "out.pt")
    assert message.startswith("fairseq-accel-compress: error: decoder.layers.0.fc1: no calibration values reached")
    assert message.endswith("--keep-float 'decoder.layers.0.fc1\\.'")
    capsys.readouterr()
    assert compress_main([str(a) for a in ("--path", pruned_lsra, "--calib-from", lacking, "--keep-float",
                                           r"decoder.layers.0.fc1\.", "--out", tmp_path / "out.pt")]) == 0

    # a calibration state of another run is not resumed
    other = tmp_path / "other.calib"
    other.write_bytes(calibrated[0].with_suffix(".calib").read_bytes())
    assert "holds the calibration of" in refused_after_progress(capsys, "--path", pruned_lsra, "--data", tiny_translation_data,
                                                  "--calib-subset", "test", "--calib-state", other,
                                                  "--out", tmp_path / "out.pt")


def test_mixed_precision_keeps_the_sensitive_layers_float(pruned_lsra: Path, calibrated: "tuple[Path, str]",
                                                          tiny_translation_data: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    common = ("--path", pruned_lsra, "--data", tiny_translation_data, *CALIBRATE, "--sensitivity-batches", "2",
              "--calib-state", calibrated[0].with_suffix(".calib"))
    plans = {}
    for budget, int4 in (("1000", ()), ("0", ()), ("1000", ("--mixed-int4",)), ("0", ("--mixed-int4",))):
        out = tmp_path / f"mixed{budget}{len(int4)}.pt"
        activations, _ = calibration_section(capsys, *common, "--max-accuracy-drop", budget, *int4, "--out", out)
        table = out.with_suffix(".sensitivity.md").read_text().splitlines()
        rows = [line.split(" | ") for line in table[3:]]
        section = read_checkpoint(str(out))[COMPRESSED_KEY]
        storage = {row.name: row.storage for row in size_rows(section)}
        stored = {f"{row[0][2:]}.weight": row[-1][:-2] for row in rows}  # the tied output projection: its embedding's
        stored = {section["aliases"].get(name, name): precision for name, precision in stored.items()}
        chosen = {precision: {name for name, p in stored.items() if p == precision} for precision in ("int4", "int8", "float32")}
        assert table[0].endswith(f"int4 layers: {len(chosen['int4'])}, int8 layers: {len(chosen['int8'])}, "
                                 f"float32 layers: {len(chosen['float32'])} (of {len(rows)})")
        assert sum(map(len, chosen.values())) == len(rows)
        # the int4 and int8 layers, and only they, are calibrated for execution and stored as levels
        assert set(activations["scales"]) == chosen["int4"] | chosen["int8"]
        assert all(storage[name] == "fp32" for name in chosen["float32"] if name in storage)
        assert all(storage[name].startswith("int4") for name in chosen["int4"])
        assert all(storage[name].startswith("int8") for name in chosen["int8"])
        assert all((row[3] != "-") == bool(int4) for row in rows)  # int4 rises are measured with --mixed-int4
        plans[budget, bool(int4)] = (chosen, [float(row[2]) for row in rows])
    assert len(plans["1000", False][0]["int8"]) == len(rows)  # any loss allowed: every layer in int8
    assert len(plans["1000", True][0]["int4"]) == len(rows)  # ... or with --mixed-int4 in int4
    assert len(plans["0", False][0]["int8"]) < len(rows)  # no loss allowed: the layers that raise it stay float32
    strict, strict_int4 = plans["0", False][0], plans["0", True][0]
    assert strict_int4["int4"] | strict_int4["int8"] == strict["int8"]  # int4 only among the layers int8 allows
    rises = plans["0", False][1]
    assert rises == sorted(rises, reverse=True)  # most sensitive first

    capsys.readouterr()
    with pytest.raises(SystemExit):
        compress_main([str(a) for a in (*common, "--max-accuracy-drop", "-0.1", "--out", tmp_path / "no.pt")])
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "fairseq-accel-compress: error: --max-accuracy-drop needs --data and a value >= 0 (loss damage), got -0.1")
    with pytest.raises(SystemExit):
        compress_main([str(a) for a in (*common, "--mixed-int4", "--out", tmp_path / "no.pt")])
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "fairseq-accel-compress: error: --mixed-int4 lets --max-accuracy-drop choose int4 layers; give "
        "--max-accuracy-drop too")


def test_mixed_precision_by_a_decoded_metric(pruned_lsra: Path, calibrated: "tuple[Path, str]",
                                             tiny_translation_data: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    """--sensitivity-metric cer (the toy model scores 0 BLEU): the table's base is the float model's CER on the
    sensitivity batches, as jiwer scores the hypotheses of a stock SequenceGenerator, its damages are in CER
    points, and the measure decodes the model as it is at each probe (a changed layer changes the CER)."""
    out = tmp_path / "cer.pt"
    activations, _ = calibration_section(
        capsys, "--path", pruned_lsra, "--data", tiny_translation_data, *CALIBRATE, "--sensitivity-batches", "2",
        "--calib-state", calibrated[0].with_suffix(".calib"), "--sensitivity-metric", "cer", "--sensitivity-beam", "2",
        "--max-accuracy-drop", "1000", "--out", out)
    table = out.with_suffix(".sensitivity.md").read_text().splitlines()
    base = float(re.fullmatch(r"float model dev cer (\d+\.\d{4}); int4 layers: 0, int8 layers: (\d+), float32 "
                              r"layers: 0 \(of \2\)", table[0]).group(1))
    assert table[1].startswith("| layer | params | cer damage alone in int8 (CER points) |")
    assert len(activations["scales"]) == len(table) - 3  # any damage allowed: every layer int8

    models, _, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(pruned_lsra)], arg_overrides={"data": str(tiny_translation_data)})
    model = models[0].eval()
    batches = list(calibration_batches(task, model, "valid", 2, 60))
    generator = SequenceGenerator([model], task.target_dictionary, beam_size=2)
    strings = lambda tokens: task.target_dictionary.string(tokens[tokens.ne(task.target_dictionary.pad())])  # noqa: E731
    references, hypotheses = [], []
    for sample in batches:
        for target, hypos in zip(sample["target"], generator.generate([model], sample)):
            references.append(strings(target).replace(" ", ""))
            hypotheses.append(strings(hypos[0]["tokens"]).replace(" ", ""))
    assert base == pytest.approx(100 * jiwer.cer(references, hypotheses), abs=1e-4)

    measure = sensitivity_measure("cer", model, task, batches, beam=2, remove_bpe=None)
    assert measure.cost() == pytest.approx(base, abs=1e-4)
    with torch.no_grad():
        model.decoder.embed_tokens.weight.neg_()  # tied output projection: other tokens win
    assert measure.cost() != pytest.approx(base, abs=1e-4)


def test_benchmark_times_the_int8_layers(calibrated: "tuple[Path, str]", pruned_lsra: Path,
                                         tiny_translation_data: Path, tmp_path: Path) -> None:
    """fairseq-accel-benchmark runs the compressed checkpoint's int8 layers (fast-w8a8) beside float32, and
    times each decoder layer shape as an int8 GEMM; a checkpoint without int8 layers says it skips them, and
    so does one trained under the stock task, until ``--task translation_accel`` loads it."""
    common = ("fairseq-accel-benchmark", tiny_translation_data, "--systems", "stock", "fast", "fast-w8a8",
              "--batch-sizes", "2", "--threads", "1", "--repeats", "1", "--max-sentences", "6",
              "--int8-min-weights", "0")
    result = run_cli([*common, "--path", calibrated[0]])
    assert result.returncode == 0, cli_output(result)
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in result.stdout.splitlines()
            if line.startswith("| stock |") or line.startswith("| fast")}
    assert set(rows) == {"stock", "fast", "fast-w8a8"}
    gemm = [line for line in result.stdout.splitlines() if line.startswith("| decoder.")]
    assert gemm and all(line.endswith("| yes |") for line in gemm)  # --int8-min-weights 0: every layer int8
    assert any(line.startswith("| decoder.output_projection |") for line in gemm)

    plain = run_cli([*common, "--path", pruned_lsra])
    assert plain.returncode == 0, cli_output(plain)
    assert "skipping fast-w8a8 fast-w8a8-kv8 fast-w8a8-kv8-cross: the checkpoint has no int8 layers" in plain.stderr
    assert "| fast-w8a8 |" not in plain.stdout and "| decoder." not in plain.stdout

    # the mini recipe trains its transformer under the stock task: the checkpoint remembers "translation"
    stock_trained = read_checkpoint(str(calibrated[0]))
    stock_trained["cfg"]["task"]["_name"] = "translation"
    stock_path = tmp_path / "stock_task.pt"
    torch.save(stock_trained, stock_path)
    as_trained = run_cli([*common, "--path", stock_path])
    assert as_trained.returncode == 0, cli_output(as_trained)
    assert ("skipping fast-w8a8 fast-w8a8-kv8 fast-w8a8-kv8-cross: its task TranslationTask runs the compressed "
            "checkpoint in float32 (--task translation_accel") in as_trained.stderr
    assert "| fast-w8a8 |" not in as_trained.stdout
    with_task = run_cli([*common, "--path", stock_path, "--task", "translation_accel"])
    assert with_task.returncode == 0, cli_output(with_task)
    assert "| fast-w8a8 |" in with_task.stdout and "skipping" not in with_task.stderr
    unknown = run_cli([*common, "--path", stock_path, "--task", "translation_acel"])
    assert unknown.returncode != 0
    assert unknown.stderr.strip().splitlines()[-1].endswith(
        "--task translation_acel: no such task (e.g. translation_accel, speech_to_text_accel)")
