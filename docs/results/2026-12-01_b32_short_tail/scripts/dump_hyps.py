"""Every hypothesis (tokens, score, positional scores) of fast-w8a8-kv8 on the first N test sentences at batch B,
saved by sentence id for comparing two builds of the extension: dump_hyps.py THREADS B N OUT.pt."""
import sys

import torch

from common import decode, workload

threads, batch_size, sentences, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
_, work, gen = workload(batch_size, sentences, threads)
hypotheses = {}
for batch, decoded in zip(work.batches, decode(work, gen)):
    for sentence, hyps in zip(batch["id"].tolist(), decoded):
        hypotheses[sentence] = [(h["tokens"].tolist(), h["score"].item(), h["positional_scores"].tolist())
                                for h in hyps]
torch.save(hypotheses, out)
print("saved", len(hypotheses))
