import os, sys, argparse, time, torch
from fairseq_accel import benchmarking as B
system = sys.argv[1]; path = sys.argv[2]
torch.set_num_threads(2)
args = argparse.Namespace(path=path, data="/work/main/egs/mini_l10n/nmt/data/bin_unigram8000", config_yaml="config.yaml", gen_subset="test", max_sentences=1192, remove_bpe="sentencepiece", beam=5, max_len_a=0, max_len_b=200, int8_min_weights=0, task=None)
task, models = B.load_checkpoint(args)
int8 = B.take_int8_model(task, models, 0) if "w8" in system else None
task.load_dataset("test")
work = B.build_workload(args, 32, task, models, int8)
gen = B._fairseq_generator(work, system)
hit, steps, t0 = 0, 0, time.perf_counter()
worst = []
for batch in work.batches:
    out = work.task.inference_step(gen, work.models, batch)
    for sid, h in zip(batch["id"].tolist(), out):
        longest = max(len(x["tokens"]) for x in h)
        steps += longest
        if longest >= 150: hit += 1; worst.append((sid, longest, len(h[0]["tokens"])))
print(system, path.split("/")[-1], "sentences", len(work.batches) and sum(len(b["id"]) for b in work.batches), "with a hyp >=150 tokens:", hit, "sum of longest:", steps, "seconds", round(time.perf_counter() - t0, 1), worst[:12])
