"""Sentence-parallel decoding: N CPU threads decode N shards of a batch, one thread each.

Beam search keeps every sentence apart (its own beams, its own finished hypotheses), so a batch can be split by
sentence and the shards decoded at the same time, each on one thread with its own decoder state (a
``FastDecoder.replica``: own caches, the same weights). A decoding step is hundreds of operations on a few
rows each; run on N OpenMP threads each of them ends at a barrier, and most are too small to split, so two
threads gained 1.2-1.4x on a 2-core machine (transformer_mini and the long LSRA at batch 32, 2026-12-01) where
two shards on one thread each gain 1.5-1.7x (docs/results/2026-12-01_sentence_parallel). CTranslate2 does the
same with ``inter_threads``. The C++ kernels release the GIL; what the shards still take turns on is the beam
search's Python (about an eighth of a step at 80 rows).

Shards take every N-th sentence of the (length-sorted) batch, so that they get the same mix of lengths. Token
sources keep the batch's padded width; speech features (``[B, T, F]``, padded at the end) are cut to the shard's
longest utterance, as fairseq's collater would batch them (stock speech encoders take their padding mask from the
lengths, so they require it). The ``--max-len-a`` limit is the batch's (its padded source length), passed on by
the generator.
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from fairseq_accel.inference.fast_decoder import FastDecoder

logger = logging.getLogger(__name__)
Shard = Tuple[List[int], dict, Optional[Tensor]]  # batch positions, sample, prefix tokens


def split_batch(sample: dict, prefix_tokens: Optional[Tensor], shards: int) -> List[Shard]:
    """``shards`` samples of every ``shards``-th sentence (from the first, the second, ...): each tensor of
    ``net_input`` with the batch's size in its first dimension is indexed, anything else passed on; speech
    features lose the frames after the shard's longest utterance."""
    net_input = sample["net_input"]
    batch = net_input["src_tokens"].size(0)
    parts = []
    for first in range(min(shards, batch)):
        positions = list(range(first, batch, shards))
        index = torch.tensor(positions, device=net_input["src_tokens"].device)
        shard_input = {
            name: value.index_select(0, index) if torch.is_tensor(value) and value.dim() and value.size(0) == batch
            else value
            for name, value in net_input.items()
        }
        if shard_input["src_tokens"].dim() == 3:  # speech features: no more frames than the longest utterance
            shard_input["src_tokens"] = shard_input["src_tokens"][:, : int(shard_input["src_lengths"].max())]
        prefix = None if prefix_tokens is None else prefix_tokens.index_select(0, index)
        parts.append((positions, {"net_input": shard_input}, prefix))
    return parts


DecodeShard = Callable[[FastDecoder, dict, Optional[Tensor]], Tuple[List, int]]


class SentenceParallel:
    """Decodes the shards of a batch on as many threads (the calling thread takes the first shard), each at one
    torch thread, with one decoder replica per extra thread, made when first needed."""

    def __init__(self, decoder: FastDecoder):
        self.decoders = [decoder]
        self.pool: Optional[ThreadPoolExecutor] = None  # a thread per replica
        self.lock = threading.Lock()

    def _decoders(self, count: int) -> List[FastDecoder]:
        if len(self.decoders) < count:
            logger.info(f"--accel-parallel sentences: batches of {count} or more sentences decode in {count} shards, "
                        "one thread each")
            while len(self.decoders) < count:
                self.decoders.append(self.decoders[0].replica())
            if self.pool is not None:
                self.pool.shutdown()
            self.pool = ThreadPoolExecutor(count - 1, thread_name_prefix="fairseq-accel-shard")
        return self.decoders[:count]

    def decode(self, sample: dict, prefix_tokens: Optional[Tensor], shards: int, decode_shard: DecodeShard
               ) -> Tuple[List, int]:
        """``decode_shard(decoder, sample, prefix_tokens) -> (hypotheses per sentence, rows decoded)`` on each
        shard; the hypotheses come back in the batch's order."""
        parts = split_batch(sample, prefix_tokens, shards)
        with self.lock:  # one batch at a time: the replicas hold its state
            decoders = self._decoders(len(parts))
            previous, grad = torch.get_num_threads(), torch.is_grad_enabled()  # grad mode is per thread
            futures: List[Future] = [self.pool.submit(_on_one_thread, decode_shard, decoder, part[1], part[2], grad)
                                     for decoder, part in zip(decoders[1:], parts[1:])]
            try:
                first = _on_one_thread(decode_shard, decoders[0], parts[0][1], parts[0][2], grad)
            finally:
                wait(futures)  # no shard outlives the call, whatever raised
                torch.set_num_threads(previous)
            results = [first] + [future.result() for future in futures]  # a shard's error is raised here
        return _merge([part[0] for part in parts], results)


def _on_one_thread(decode_shard: DecodeShard, decoder: FastDecoder, sample: dict, prefix_tokens: Optional[Tensor],
                   grad: bool):
    torch.set_num_threads(1)
    with torch.set_grad_enabled(grad):
        return decode_shard(decoder, sample, prefix_tokens)


def _merge(positions: Sequence[List[int]], results: Sequence[Tuple[List, int]]) -> Tuple[List, int]:
    by_position: Dict[int, object] = {}
    for shard_positions, (hypotheses, _) in zip(positions, results):
        by_position.update(zip(shard_positions, hypotheses))
    return [by_position[i] for i in range(len(by_position))], sum(rows for _, rows in results)
