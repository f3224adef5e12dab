"""How many test sentences have a finished hypothesis of 150 tokens or more (batch 32, 2 threads):
maxlen_count.py SYSTEM (fast: the float checkpoint; fast-w8a8-kv8: the int8 copy)."""
import sys
import time

from common import decode, workload

system = sys.argv[1]
args, work, gen = workload(32, sentences=1192, threads=2, system=system)
start, hit, steps, worst = time.perf_counter(), 0, 0, []
for batch, out in zip(work.batches, decode(work, gen)):
    for sentence, hypotheses in zip(batch["id"].tolist(), out):
        longest = max(len(h["tokens"]) for h in hypotheses)
        steps += longest
        if longest >= 150:
            hit += 1
            worst.append((sentence, longest, len(hypotheses[0]["tokens"])))
print(system, args.path.split("/")[-1], "sentences", sum(len(b["id"]) for b in work.batches),
      "with a hyp >=150 tokens:", hit, "sum of longest:", steps, "seconds", round(time.perf_counter() - start, 1),
      worst[:12])
