"""1 thread: fast int8 at batch B against CTranslate2 int8 (one translator of one thread, max_batch_size B), in
turn: one_thread.py B [REPEATS] (NSENT: sentences, default 64)."""
import os
import sys
from pathlib import Path

from common import workload
from fairseq_accel import benchmarking as B

batch_size, repeats = int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 5
args, work, gen = workload(batch_size, int(os.environ.get("NSENT", 64)))
ct2 = B._ct2_runner(args, work, B._ct2_convert(args, work, "int8", Path("/tmp/ct2conv_ot")), 1)
systems = {"fast": lambda: B._run_fairseq(work, gen, work.batches), "ct2": lambda: ct2(work.batches)}
seconds = {name: [] for name in systems}
for run in systems.values():
    run()
for _ in range(repeats):
    for name, run in systems.items():
        seconds[name].append(run()[0])
for name, times in seconds.items():
    print(name, "best %.4f median %.4f" % (min(times), sorted(times)[len(times) // 2]))
print("fast/ct2 speed (best):", min(seconds["ct2"]) / min(seconds["fast"]))
