"""Each sentence's source length, best hypothesis length and longest finished hypothesis, by shard (batches of 32
in two shards of every other sentence): lens.py THREADS."""
import sys

from common import decode, workload

_, work, gen = workload(32, threads=int(sys.argv[1]))
for index, (batch, out) in enumerate(zip(work.batches, decode(work, gen))):
    sources = batch["net_input"]["src_lengths"].tolist()
    best = [len(hypotheses[0]["tokens"]) for hypotheses in out]
    longest = [max(len(h["tokens"]) for h in hypotheses) for hypotheses in out]
    print("batch", index)
    for shard in (0, 1):
        rows = list(range(shard, len(sources), 2))
        print(" shard", shard, "src", [sources[i] for i in rows])
        print("         out", [best[i] for i in rows], "longest hyp", [longest[i] for i in rows])
