"""The recipes' distillation stages (egs/tools/distill_stages.sh): a teacher, the student alone and distilled with
the shipped conf/distill/*.yaml (minilm_distillation criterion, sequence-level KD on the teacher's beam outputs),
and the teacher / student / distilled table."""
import json
from pathlib import Path

from conftest import REPO_ROOT, cli_output, run_cli
from test_compress_recipes import NMT_RECIPE, TOOLS, binarized_toy_corpus, table_rows
from test_joint_ctc_attention import write_tiny_speech_data

ASR_RECIPE = REPO_ROOT / "egs" / "mini_espeak" / "asr"


def test_mini_nmt_recipe_distillation_stages(tmp_path):
    """Stages 11-12 of egs/mini_l10n/nmt/run.sh on the toy corpus with a 2-update budget: the teacher is trained
    from its config, translates the training set, and the student is trained alone, with MiniLM and on the
    teacher's targets; a rerun finds every step done."""
    data, exp = tmp_path / "data", tmp_path / "exp"
    binarized_toy_corpus(data, "unigram8000")
    command = [
        "bash", NMT_RECIPE / "run.sh", "--stage", "11", "--stop_stage", "12", "--data_dir", data, "--exp_dir", exp,
        "--distill_teacher", "conf/lite_transformer_mini.yaml",
        "--distill_configs", "conf/distill/minilm.yaml conf/distill/seqkd.yaml",
        "--train_args", "--max-update 2 --max-tokens 1024", "--gen_subset", "valid",
        "--decode_args", "--beam 2 --max-len-a 0 --max-len-b 6 --batch-size 128",
    ]
    result = run_cli(command, timeout=600)
    assert result.returncode == 0, cli_output(result)[-5000:]

    teacher = exp / "lite_transformer_mini"
    student = exp / "lite_transformer_half"
    rows = json.loads((exp / "DISTILL.json").read_text())
    assert [row["experiment"] for row in rows] == [
        teacher.name, student.name, "lite_transformer_half__minilm", "lite_transformer_half__seqkd"]
    assert rows[0]["params"] > 2 * rows[1]["params"] and rows[1]["params"] == rows[2]["params"] == rows[3]["params"]
    assert set(table_rows((exp / "DISTILL.md").read_text())) == {row["experiment"] for row in rows}

    minilm_args = (exp / "lite_transformer_half__minilm" / "train.args").read_text().split("\n")
    assert minilm_args[minilm_args.index("--criterion") + 1] == "minilm_distillation"
    assert minilm_args[minilm_args.index("--encoder-embed-dim") + 1] == "128"  # the student's section below
    minilm_log = (exp / "lite_transformer_half__minilm" / "train.log").read_text()
    assert f"--teacher-path', '{teacher}/checkpoints/checkpoint_best.pt" in minilm_log or \
        f"'teacher_path': '{teacher}/checkpoints/checkpoint_best.pt'" in minilm_log
    assert "at_loss" in minilm_log and "conv_at_loss" in minilm_log

    seqkd_bin = data / "bin_unigram8000_seqkd_lite_transformer_mini"
    targets = (seqkd_bin / "text" / "train.en").read_text().splitlines()
    assert len(targets) == len((data / "text" / "train.de").read_text().splitlines())
    seqkd_log = (exp / "lite_transformer_half__seqkd" / "train.log").read_text()
    assert str(seqkd_bin) in seqkd_log and "teacher_path" not in seqkd_log

    rerun = run_cli(command, timeout=600)
    assert rerun.returncode == 0, cli_output(rerun)[-3000:]
    # teacher: decode, targets; 3 students: train + decode
    assert rerun.stderr.count("already done") == 2 + 3 * 2


def test_asr_distillation_stages(tmp_path):
    """Stages 9-10 of egs/tools/asr.sh (the mini espeak recipe's configs) on tiny random-feature data: SAN-M
    teacher, its transcripts as the student's targets, the half-width student alone, with MiniLM on the last
    encoder layer and KD of the CTC head, and on the teacher's transcripts."""
    (tmp_path / "s2t").mkdir()
    s2t = write_tiny_speech_data(tmp_path / "s2t")
    exp = tmp_path / "exp"
    command = [
        "bash", TOOLS / "asr.sh", "--stage", "9", "--stop_stage", "10", "--s2t_dir", s2t, "--exp_dir", exp,
        "--train_set", "train", "--valid_set", "dev", "--test_set", "test",
        "--configs", "conf/s2t_sanm_mini.yaml", "--distill_teacher", "conf/s2t_sanm_mini.yaml",
        "--distill_student", "conf/distill/s2t_sanm_half.yaml",
        "--distill_configs", "conf/distill/minilm_ctc.yaml conf/distill/seqkd.yaml",
        "--train_args", "--max-update 2 --max-tokens 4000", "--train_jobs", "2",
    ]
    result = run_cli(command, cwd=ASR_RECIPE, timeout=600)
    assert result.returncode == 0, cli_output(result)[-5000:]
    rows = json.loads((exp / "DISTILL.json").read_text())
    assert [row["experiment"] for row in rows] == [
        "s2t_sanm_mini", "s2t_sanm_half", "s2t_sanm_half__minilm_ctc", "s2t_sanm_half__seqkd"]
    assert rows[0]["params"] > 2 * rows[1]["params"] and rows[1]["params"] == rows[2]["params"] == rows[3]["params"]
    minilm_log = (exp / "s2t_sanm_half__minilm_ctc" / "train.log").read_text()
    assert "at_loss" in minilm_log and "ctc_kd_loss" in minilm_log and "conv_at_loss" not in minilm_log
    seqkd = Path(f"{s2t}_seqkd_s2t_sanm_mini")
    teacher_rows = (seqkd / "train.tsv").read_text().splitlines()
    assert len(teacher_rows) == len((s2t / "train.tsv").read_text().splitlines())
    assert [row.split("\t")[:3] for row in teacher_rows] == [
        row.split("\t")[:3] for row in (s2t / "train.tsv").read_text().splitlines()]  # same utterances
    assert str(seqkd) in (exp / "s2t_sanm_half__seqkd" / "train.log").read_text()
