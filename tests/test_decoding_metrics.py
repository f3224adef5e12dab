"""The metrics of decoded output (fairseq_accel/decoding_metrics.py) against hand-counted cases and the
reference implementations the recipes score with (sacrebleu; jiwer, as egs/tools/asr_results.py)."""
import jiwer
import pytest
import sacrebleu

from fairseq_accel.decoding_metrics import corpus_score

REFERENCES = ["the cat sat on the mat", "open the file", "save all changes now"]
HYPOTHESES = ["the cat sat on a mat", "open file", "save all the changes now"]


def test_error_rates_count_edits_per_reference_unit() -> None:
    # words: 1 substitution + 1 deletion + 1 insertion over 6 + 3 + 4 reference words
    assert corpus_score("wer", REFERENCES, HYPOTHESES) == pytest.approx(100 * 3 / 13)
    # characters without spaces: "the"->"a" (2 deletions, 1 substitution), "the" deleted (3), "the" inserted (3)
    chars = sum(len(r.replace(" ", "")) for r in REFERENCES)
    assert corpus_score("cer", REFERENCES, HYPOTHESES) == pytest.approx(100 * 9 / chars)


def test_scores_match_the_recipes_scorers() -> None:
    assert corpus_score("wer", REFERENCES, HYPOTHESES) == pytest.approx(100 * jiwer.wer(REFERENCES, HYPOTHESES))
    assert corpus_score("cer", REFERENCES, HYPOTHESES) == pytest.approx(
        100 * jiwer.cer([r.replace(" ", "") for r in REFERENCES], [h.replace(" ", "") for h in HYPOTHESES]))
    assert corpus_score("bleu", REFERENCES, HYPOTHESES) == sacrebleu.corpus_bleu(HYPOTHESES, [REFERENCES]).score
    assert corpus_score("bleu", REFERENCES, REFERENCES) == pytest.approx(100)


def test_unknown_metric_is_refused() -> None:
    with pytest.raises(ValueError, match="metric must be one of"):
        corpus_score("ter", REFERENCES, HYPOTHESES)
