"""Sentence-parallel decoding (fairseq_accel/inference/sentence_parallel.py): a batch split into shards of every
N-th sentence, decoded on N threads with decoder replicas that share the weights, merged back in the batch's
order; a shard's error reaches the caller after every shard stopped. (That the hypotheses equal stock's is
tested on real models in test_fast_generator.py.)"""
import threading

import pytest
import torch

from fairseq_accel.inference.sentence_parallel import SentenceParallel, split_batch


class CountingDecoder:
    """Stands in for a FastDecoder: replicas are counted, nothing is decoded."""

    def __init__(self):
        self.replicas = []

    def replica(self):
        self.replicas.append(CountingDecoder())
        return self.replicas[-1]


def sample(batch: int = 5) -> dict:
    return {"net_input": {"src_tokens": torch.arange(batch * 3).view(batch, 3), "src_lengths": torch.full((batch,), 3),
                          "scale": torch.tensor(2.0), "mode": "text"}}


def test_split_batch_takes_every_nth_sentence() -> None:
    prefix = torch.arange(5).view(5, 1) * 10
    parts = split_batch(sample(), prefix, 2)
    assert [positions for positions, _, _ in parts] == [[0, 2, 4], [1, 3]]
    positions, shard, shard_prefix = parts[1]
    assert torch.equal(shard["net_input"]["src_tokens"], sample()["net_input"]["src_tokens"][[1, 3]])
    assert shard["net_input"]["src_lengths"].tolist() == [3, 3] and shard_prefix.view(-1).tolist() == [10, 30]
    assert shard["net_input"]["mode"] == "text" and float(shard["net_input"]["scale"]) == 2.0  # not per sentence
    assert len(split_batch(sample(2), None, 4)) == 2  # never an empty shard
    features = {"net_input": {"src_tokens": torch.randn(4, 9, 2), "src_lengths": torch.tensor([9, 8, 5, 3])}}
    shards = [shard["net_input"]["src_tokens"] for _, shard, _ in split_batch(features, None, 2)]
    assert [tuple(s.shape) for s in shards] == [(2, 9, 2), (2, 8, 2)]  # as the collater pads: to the longest
    assert torch.equal(shards[1], features["net_input"]["src_tokens"][[1, 3], :8])


def test_shards_run_on_their_own_threads_and_merge_in_batch_order() -> None:
    decoder = CountingDecoder()
    parallel = SentenceParallel(decoder)
    seen = []
    together = threading.Barrier(3, timeout=30)  # passed only if the three shards run at the same time

    def decode_shard(shard_decoder, shard, prefix):
        seen.append((shard_decoder, threading.current_thread().name, torch.get_num_threads()))
        together.wait()
        rows = shard["net_input"]["src_tokens"][:, 0].tolist()
        return [f"sentence {row // 3}" for row in rows], len(rows)

    previous = torch.get_num_threads()
    hypotheses, rows = parallel.decode(sample(7), None, 3, decode_shard)
    assert hypotheses == [f"sentence {i}" for i in range(7)] and rows == 7
    assert {id(d) for d, _, _ in seen} == {id(decoder), *map(id, decoder.replicas)} and len(decoder.replicas) == 2
    assert len({name for _, name, _ in seen}) == 3 and {threads for _, _, threads in seen} == {1}
    assert torch.get_num_threads() == previous
    together = threading.Barrier(2, timeout=30)
    parallel.decode(sample(7), None, 2, decode_shard)
    assert len(decoder.replicas) == 2  # made once


def test_a_failing_shard_raises_after_every_shard_stopped() -> None:
    parallel = SentenceParallel(CountingDecoder())
    finished, failing = [], [True]

    def decode_shard(shard_decoder, shard, prefix):
        first = int(shard["net_input"]["src_tokens"][0, 0]) // 3
        if first == 1 and failing[0]:
            raise RuntimeError("shard of sentence 1 failed")
        finished.append(first)
        return [None] * shard["net_input"]["src_tokens"].size(0), 0

    previous = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="shard of sentence 1 failed"):
        parallel.decode(sample(6), None, 3, decode_shard)
    assert sorted(finished) == [0, 2] and torch.get_num_threads() == previous
    finished.clear()
    failing[0] = False
    parallel.decode(sample(6), None, 2, decode_shard)  # the generator is usable afterwards
    assert sorted(finished) == [0, 1]
