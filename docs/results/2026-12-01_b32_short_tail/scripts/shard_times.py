"""When each sentence shard of each batch of 32 starts and ends (2 threads, 2 shards): shard_times.py THREADS; with
SERIAL=1 the shards take turns (each one's time alone)."""
import os
import sys

from common import decode, record_shards, workload

_, work, gen = workload(32, threads=int(sys.argv[1]))
shard_log, decode_log = record_shards(serial=bool(os.environ.get("SERIAL")))
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
