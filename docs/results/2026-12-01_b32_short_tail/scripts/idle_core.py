"""How much of a pass the second core idles at a batch's end (batches of 32 in 2 shards, 2 threads): per batch, twice
its decode time minus both shards' busy times, summed over the pass: idle_core.py SENTENCES."""
import sys
import threading
import time

from common import decode, workload
from fairseq_accel.inference import sentence_parallel as SP

_, work, gen = workload(32, sentences=int(sys.argv[1]), threads=2)
busy, walls = [], []
on_one_thread, parallel_decode = SP._on_one_thread, SP.SentenceParallel.decode


def timed_shard(*args, **kwargs):
    start = time.perf_counter()
    result = on_one_thread(*args, **kwargs)
    busy.append(time.perf_counter() - start)
    return result


def timed_decode(self, *args, **kwargs):
    start = time.perf_counter()
    result = parallel_decode(self, *args, **kwargs)
    walls.append(time.perf_counter() - start)
    return result


SP._on_one_thread, SP.SentenceParallel.decode = timed_shard, timed_decode
decode(work, gen)
for repeat in range(3):
    busy.clear(), walls.clear()
    decode(work, gen)
    idle = 2 * sum(walls) - sum(busy)
    print(f"pass {repeat}: {len(walls)} batches, decode {sum(walls):.3f} s, shards busy {sum(busy):.3f} core-s, "
          f"second core idle {idle:.3f} s = {idle / (2 * sum(walls)):.0%} of the two cores' time")
