"""fast-w8a8-kv8 on the first 64 test sentences at batch 32: perf64_b32.py THREADS [REPEATS]."""
import sys

from common import best_of, decode, workload

threads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 10
_, work, gen = workload(32, threads=threads)
decode(work, gen)
print("threads", threads, "best", best_of(repeats, lambda: decode(work, gen)))
