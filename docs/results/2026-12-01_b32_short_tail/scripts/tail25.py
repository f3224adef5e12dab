"""Sentence 25 (its search runs to the length limit) decoded alone at batch 1, REPEATS times after one warm-up;
prints the process id first (for perf record -p): tail25.py THREADS REPEATS."""
import os
import sys
import time

from common import decode, workload

_, work, gen = workload(1, threads=int(sys.argv[1]))
batch = [b for b in work.batches if b["id"].item() == 25]
decode(work, gen, batch)
print("pid", os.getpid(), flush=True)
start = time.perf_counter()
for _ in range(int(sys.argv[2])):
    decode(work, gen, batch)
print("per decode ms", (time.perf_counter() - start) / int(sys.argv[2]) * 1e3)
