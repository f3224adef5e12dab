"""Each of the first 64 test sentences whose search runs over 100 steps, decoded alone at batch 1, best of 7:
b1_each.py THREADS [SYSTEM] (fast-w8a8-kv8, the default, or fast: the float checkpoint)."""
import sys

from common import best_of, decode, workload

_, work, gen = workload(1, threads=int(sys.argv[1]), system=sys.argv[2] if len(sys.argv) > 2 else "fast-w8a8-kv8")
for batch in work.batches:
    hypotheses = decode(work, gen, [batch])[0][0]
    longest = max(len(h["tokens"]) for h in hypotheses)
    if longest > 100:
        seconds = best_of(7, lambda: decode(work, gen, [batch]))
        print("id", batch["id"].item(), "src", batch["net_input"]["src_lengths"].item(), "longest", longest, "best",
              len(hypotheses[0]["tokens"]), f"best of 7 {seconds * 1e3:.1f} ms = {seconds / longest * 1e6:.0f} us/step")
