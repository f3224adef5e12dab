"""A batch of 32 in SHARDS_PER_THREAD x THREADS shards that THREADS threads take from a queue (longest sources
first), against the generator's one shard per thread: queue_shards.py THREADS SHARDS_PER_THREAD SENTENCES REPEATS."""
import sys
import threading
from concurrent.futures import wait

import torch

from common import best_of, decode, workload
from fairseq_accel.inference import sentence_parallel as SP

threads, per_thread, sentences, repeats = (int(a) for a in sys.argv[1:5])
_, work, gen = workload(32, sentences, threads)


def queued_decode(self, sample, prefix_tokens, shards, decode_shard):
    parts = SP.split_batch(sample, prefix_tokens, shards * per_thread)
    with self.lock:
        decoders = self._decoders(shards)
        previous, grad = torch.get_num_threads(), torch.is_grad_enabled()
        taken, results, next_part = threading.Lock(), [None] * len(parts), [0]

        def worker(decoder):
            while True:
                with taken:
                    index, next_part[0] = next_part[0], next_part[0] + 1
                if index >= len(parts):
                    return
                results[index] = SP._on_one_thread(decode_shard, decoder, parts[index][1], parts[index][2], grad)

        futures = [self.pool.submit(worker, decoder) for decoder in decoders[1:]]
        try:
            worker(decoders[0])
        finally:
            wait(futures)
            torch.set_num_threads(previous)
        for future in futures:
            future.result()
    return SP._merge([part[0] for part in parts], results)


if per_thread > 1:
    SP.SentenceParallel.decode = queued_decode
tokens = sum(len(h[0]["tokens"]) for out in decode(work, gen) for h in out)
best = best_of(repeats, lambda: decode(work, gen))
print(f"threads {threads} shards/thread {per_thread} sentences {sentences}: best {best:.3f} s, {tokens / best:.0f} tok/s")
