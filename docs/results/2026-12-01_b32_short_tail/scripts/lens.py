import os
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "perf64_b32.py")).read().split("def run():")[0])
for bi, batch in enumerate(work.batches):
    out = work.task.inference_step(gen, work.models, batch)
    src = batch["net_input"]["src_lengths"].tolist()
    outl = [len(h[0]["tokens"]) for h in out]
    # best hypothesis length and longest finished hyp
    longest = [max(len(x["tokens"]) for x in h) for h in out]
    print("batch", bi)
    for shard in (0, 1):
        idx = list(range(shard, len(src), 2))
        print(" shard", shard, "src", [src[i] for i in idx])
        print("         out", [outl[i] for i in idx], "longest hyp", [longest[i] for i in idx])
