# decode the first N test sentences with fast-w8a8-kv8 at batch B, threads T; save every hypothesis
import os, sys, argparse, torch
from fairseq_accel import benchmarking as B
threads, bs, n, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.set_num_threads(threads)
args = argparse.Namespace(path="/work/nmt_exp/tf_mini/c_int8.pt", data="/work/main/egs/mini_l10n/nmt/data/bin_unigram8000", config_yaml="config.yaml", gen_subset="test", max_sentences=n, remove_bpe="sentencepiece", beam=5, max_len_a=0, max_len_b=200, int8_min_weights=0, task=None)
task, models = B.load_checkpoint(args)
int8 = B.take_int8_model(task, models, 0)
task.load_dataset("test")
work = B.build_workload(args, bs, task, models, int8)
gen = B._fairseq_generator(work, "fast-w8a8-kv8")
res = {}
for batch in work.batches:
    for sid, hyps in zip(batch["id"].tolist(), work.task.inference_step(gen, work.models, batch)):
        res[sid] = [(h["tokens"].tolist(), h["score"].item(), h["positional_scores"].tolist()) for h in hyps]
torch.save(res, out)
print("saved", len(res))
