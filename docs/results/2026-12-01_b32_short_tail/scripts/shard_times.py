import os
import time, collections, threading
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "perf64_b32.py")).read().split("def run():")[0])
from fairseq_accel.inference import sentence_parallel as SP
log = []
orig = SP._on_one_thread
LOCK = threading.Lock() if os.environ.get("SERIAL") else None
def w(*a, **k):
    if LOCK: LOCK.acquire()
    t = time.perf_counter(); r = orig(*a, **k); log.append((threading.current_thread().name[-3:], t, time.perf_counter(), len(r[0]), r[1]))
    if LOCK: LOCK.release()
    return r
SP._on_one_thread = w
orig_dec = SP.SentenceParallel.decode
calls = []
def d(self, *a, **k):
    t = time.perf_counter(); r = orig_dec(self, *a, **k); calls.append((t, time.perf_counter())); return r
SP.SentenceParallel.decode = d
def run():
    for batch in work.batches:
        work.task.inference_step(gen, work.models, batch)
for _ in range(3): run()
log.clear(); calls.clear()
for _ in range(5): run()
for (c0, c1) in calls:
    shards = [l for l in log if l[1] >= c0 and l[2] <= c1]
    print(f"decode {1e3*(c1-c0):6.1f} ms: " + "  ".join(f"[{n} start+{1e3*(s-c0):4.1f} dur {1e3*(e-s):5.1f} sents {k} rows {r}]" for n, s, e, k, r in shards))
