"""The ASR recipes end to end through their real entry points, with tiny budgets: the offline espeak-ng
mini recipe on freshly synthesized speech, and the AISHELL-1 recipe on a fixture in the real layout."""
import json
import shutil
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import pytest
import yaml

from conftest import REPO_ROOT, cli_output, run_cli
from test_aishell_prep import make_corpus

TINY_TRAIN = "--max-update 2 --max-tokens 4000 --cpu --num-workers 0"
TINY_DECODE = "--beam 2 --max-len-a 0 --max-len-b 5 --cpu"


def levenshtein(reference: Sequence[str], hypothesis: Sequence[str]) -> int:
    """Substitutions + deletions + insertions turning ``reference`` into ``hypothesis`` (own DP, so the
    check does not share code with the recipe's scorer)."""
    previous = list(range(len(hypothesis) + 1))
    for i, ref_item in enumerate(reference, 1):
        current = [i]
        for j, hyp_item in enumerate(hypothesis, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref_item != hyp_item)))
        previous = current
    return previous[-1]


def error_rate(references: List[str], hypotheses: List[str], units: Callable[[str], Sequence[str]]) -> float:
    """Corpus-level error rate in percent: all edits over all reference units."""
    edits = sum(levenshtein(units(ref), units(hyp)) for ref, hyp in zip(references, hypotheses))
    return 100 * edits / sum(len(units(ref)) for ref in references)


def words(text: str) -> List[str]:
    return text.split()


def characters(text: str) -> List[str]:
    return list(text.replace(" ", ""))


def check_results(exp_dir: Path, subset: str, experiments: List[str]) -> List[Dict[str, object]]:
    """RESULTS.json and RESULTS.md hold one row per experiment, in order, whose WER and CER equal the
    rates recomputed here from the hypotheses and references the decoding stage wrote."""
    rows = json.loads((exp_dir / "RESULTS.json").read_text())
    assert [row["experiment"] for row in rows] == experiments
    table = [line for line in (exp_dir / "RESULTS.md").read_text().splitlines()[2:] if line.startswith("| ")]
    assert [line.split(" | ")[0][2:] for line in table] == experiments
    for row, line in zip(rows, table):
        decode_dir = exp_dir / str(row["experiment"]) / f"decode_{subset}"
        hypotheses = (decode_dir / "hyp.txt").read_text(encoding="utf-8").splitlines()
        references = (decode_dir / "ref.txt").read_text(encoding="utf-8").splitlines()
        assert len(hypotheses) == len(references) == row["sentences"]
        wer, cer = error_rate(references, hypotheses, words), error_rate(references, hypotheses, characters)
        assert row["wer"] == pytest.approx(wer, abs=1e-9) and row["cer"] == pytest.approx(cer, abs=1e-9)
        assert line.split(" | ")[3:5] == [f"{wer:.2f}", f"{cer:.2f}"], line
    return rows


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed: apt-get install espeak-ng")
def test_mini_espeak_recipe_end_to_end(tmp_path):
    """Synthesis, features, fairseq-train of s2t_sanm_mini and the stock baseline with joint CTC,
    fairseq-generate, WER/CER table; a rerun skips every finished step."""
    command = [
        "bash", REPO_ROOT / "egs" / "mini_espeak" / "asr" / "run.sh", "--num_utts", "60",
        "--data_dir", tmp_path / "data", "--exp_dir", tmp_path / "exp",
        "--train_args", TINY_TRAIN, "--decode_args", TINY_DECODE,
    ]
    result = run_cli(command, timeout=900)
    assert result.returncode == 0, cli_output(result)[-5000:]
    rows = check_results(tmp_path / "exp", "test", ["s2t_sanm_mini", "s2t_transformer_mini"])
    assert [row["arch"] for row in rows] == ["s2t_sanm_mini", "s2t_transformer"]
    transcripts = sorted(line.split(" ", 1)[1] for line in (tmp_path / "data" / "test" / "text").read_text().splitlines())
    for row in rows:  # scored against the real test transcripts, all of them
        references = (tmp_path / "exp" / str(row["experiment"]) / "decode_test" / "ref.txt").read_text().splitlines()
        assert sorted(references) == transcripts
    assert "| s2t_sanm_mini | s2t_sanm_mini |" in result.stdout
    transforms = yaml.safe_load((tmp_path / "data" / "s2t" / "config.yaml").read_text())["feature_transforms"]
    assert transforms == {"*": ["global_cmvn"]}  # the recipe's --specaugment false
    rerun = run_cli(command, timeout=600)
    assert rerun.returncode == 0, cli_output(rerun)[-3000:]
    assert rerun.stderr.count("already done") == 6  # synthesis, features, train + decode of both configs


def test_aishell_recipe_on_a_fixture(tmp_path):
    """Stages 1-5 of egs/aishell/asr/run.sh (no download) on packed per-speaker archives."""
    corpus = make_corpus(tmp_path, packed=True)
    command = [
        "bash", REPO_ROOT / "egs" / "aishell" / "asr" / "run.sh", "--stage", "1", "--aishell_dir", corpus,
        "--data_dir", tmp_path / "data", "--exp_dir", tmp_path / "exp", "--nj", "1",
        "--train_args", TINY_TRAIN.replace("--max-update 2", "--max-epoch 2"), "--average_checkpoints", "2",
        "--decode_args", TINY_DECODE,
    ]
    result = run_cli(command, timeout=900)
    assert result.returncode == 0, cli_output(result)[-5000:]
    s2t = tmp_path / "data" / "s2t"
    assert (s2t / "spm_char.model").is_file() and (s2t / "config.yaml").is_file()
    assert "specaugment" in yaml.safe_load((s2t / "config.yaml").read_text())["feature_transforms"]["_train"]
    train_tsv = (s2t / "train.tsv").read_text(encoding="utf-8").splitlines()
    assert train_tsv[0].split("\t") == ["id", "audio", "n_frames", "tgt_text", "speaker"]
    assert any("而对楼市成交抑制作用最大的限购" in line for line in train_tsv)  # characters, no spaces
    # decoded: the average of the two epoch checkpoints (the recipe's default averages the last 10)
    averaged = tmp_path / "exp" / "s2t_sanm_s" / "checkpoints" / "checkpoint_average.pt"
    assert "averaged 2 checkpoints (checkpoint1.pt ... checkpoint2.pt)" in (averaged.parent.parent / "average.log").read_text()
    assert f"loading model(s) from {averaged}" in (averaged.parent.parent / "decode_test" / "generate.txt").read_text()
    rows = check_results(tmp_path / "exp", "test", ["s2t_sanm_s"])
    assert [row["arch"] for row in rows] == ["s2t_sanm_s"]
    assert rows[0]["sentences"] == 2  # the two test utterances of the fixture
