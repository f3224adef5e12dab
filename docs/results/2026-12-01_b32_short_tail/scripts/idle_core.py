"""How much of a pass the second core idles at a batch's end (batches of 32 in 2 shards, 2 threads): per batch, twice
its decode time minus both shards' busy times, summed over the pass: idle_core.py SENTENCES."""
import sys

from common import decode, record_shards, workload

_, work, gen = workload(32, sentences=int(sys.argv[1]), threads=2)
shard_log, decode_log = record_shards()
decode(work, gen)
for repeat in range(3):
    shard_log.clear(), decode_log.clear()
    decode(work, gen)
    wall = sum(end - start for start, end in decode_log)
    busy = sum(end - start for _, start, end, _, _ in shard_log)
    idle = 2 * wall - busy
    print(f"pass {repeat}: {len(decode_log)} batches, decode {wall:.3f} s, shards busy {busy:.3f} core-s, "
          f"second core idle {idle:.3f} s = {idle / (2 * wall):.0%} of the two cores' time")
