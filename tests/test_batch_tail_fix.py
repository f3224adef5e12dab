"""fairseq 0.12 drops a last batch whose size is not a multiple of --required-batch-size-multiple; the
plugin keeps it (fairseq issue #5036)."""
import numpy as np
import pytest
from fairseq.data import data_utils

import fairseq_accel.plugin  # noqa: F401  (installs the fix)
from conftest import USER_DIR, cli_output, run_cli


@pytest.mark.parametrize("count, max_sentences", [(13, 8), (40, 16), (7, 8), (16, 8)])
def test_every_index_is_batched_once(count, max_sentences):
    indices = np.arange(count, dtype=np.int64)
    batches = data_utils.batch_by_size(
        indices, num_tokens_fn=None, max_sentences=max_sentences, required_batch_size_multiple=8,
        num_tokens_vec=np.full(count, 5, dtype=np.int64),
    )
    assert sorted(np.concatenate(batches).tolist()) == list(range(count))


def test_unpatched_fairseq_drops_the_tail_so_the_check_can_fail():
    original = data_utils.batch_by_size.__wrapped__
    batches = original(np.arange(13, dtype=np.int64), num_tokens_fn=None, max_sentences=8,
                       required_batch_size_multiple=8, num_tokens_vec=np.full(13, 5, dtype=np.int64))
    assert sum(len(batch) for batch in batches) < 13


def test_fairseq_generate_translates_every_sentence(tiny_translation_data, tmp_path):
    """40 test sentences in batches of 5: stock fairseq drops the eighth batch (5 is not a multiple of 8)."""
    train = run_cli(["fairseq-train", tiny_translation_data, "--user-dir", USER_DIR, "--arch", "transformer",
                     "--encoder-layers", "1", "--decoder-layers", "1", "--encoder-embed-dim", "16",
                     "--decoder-embed-dim", "16", "--encoder-ffn-embed-dim", "32", "--decoder-ffn-embed-dim", "32",
                     "--encoder-attention-heads", "2", "--decoder-attention-heads", "2", "--optimizer", "adam",
                     "--lr", "1e-3", "--max-tokens", "1000", "--max-update", "1", "--cpu", "--num-workers", "0",
                     "--no-progress-bar", "--disable-validation", "--save-dir", tmp_path])
    assert train.returncode == 0, cli_output(train)
    generate = run_cli(["fairseq-generate", tiny_translation_data, "--user-dir", USER_DIR, "--path",
                        tmp_path / "checkpoint_last.pt", "--batch-size", "5", "--beam", "2", "--max-len-b", "5",
                        "--cpu"])
    assert generate.returncode == 0, cli_output(generate)
    assert sum(line.startswith("H-") for line in generate.stdout.splitlines()) == 40
