"""When each sentence shard of each batch of 32 starts and ends (2 threads, 2 shards): shard_times.py THREADS; with
SERIAL=1 the shards take turns (each one's time alone)."""
import os
import sys
import threading
import time

from common import decode, workload
from fairseq_accel.inference import sentence_parallel as SP

_, work, gen = workload(32, threads=int(sys.argv[1]))
shard_log, decode_log = [], []
serial = threading.Lock() if os.environ.get("SERIAL") else None
on_one_thread, parallel_decode = SP._on_one_thread, SP.SentenceParallel.decode


def timed_shard(*args, **kwargs):
    if serial:
        serial.acquire()
    start = time.perf_counter()
    result = on_one_thread(*args, **kwargs)
    shard_log.append((threading.current_thread().name[-3:], start, time.perf_counter(), len(result[0]), result[1]))
    if serial:
        serial.release()
    return result


def timed_decode(self, *args, **kwargs):
    start = time.perf_counter()
    result = parallel_decode(self, *args, **kwargs)
    decode_log.append((start, time.perf_counter()))
    return result


SP._on_one_thread, SP.SentenceParallel.decode = timed_shard, timed_decode
for _ in range(3):
    decode(work, gen)
shard_log.clear(), decode_log.clear()
for _ in range(5):
    decode(work, gen)
for begin, end in decode_log:
    shards = [entry for entry in shard_log if entry[1] >= begin and entry[2] <= end]
    print(f"decode {1e3 * (end - begin):6.1f} ms: " + "  ".join(
        f"[{name} start+{1e3 * (s - begin):4.1f} dur {1e3 * (e - s):5.1f} sents {count} rows {rows}]"
        for name, s, e, count, rows in shards))
