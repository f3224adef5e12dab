import os, sys, argparse, time, torch
from fairseq_accel import benchmarking as B
torch.set_num_threads(int(sys.argv[1]))
args = argparse.Namespace(path="/work/nmt_exp/tf_mini/ckpt/checkpoint_best.pt", data="/work/main/egs/mini_l10n/nmt/data/bin_unigram8000", config_yaml="config.yaml", gen_subset="test", max_sentences=64, remove_bpe="sentencepiece", beam=5, max_len_a=0, max_len_b=200, int8_min_weights=0, task=None)
task, models = B.load_checkpoint(args)
int8 = None
task.load_dataset("test")
work = B.build_workload(args, 1, task, models, int8)
gen = B._fairseq_generator(work, "fast")
for batch in work.batches:
    out = work.task.inference_step(gen, work.models, batch)
    longest = max(len(x["tokens"]) for x in out[0])
    if longest > 100:
        ts = []
        for _ in range(7):
            t = time.perf_counter(); work.task.inference_step(gen, work.models, batch); ts.append(time.perf_counter() - t)
        print("id", batch["id"].item(), "src", batch["net_input"]["src_lengths"].item(), "longest", longest, "best", len(out[0][0]["tokens"]), f"best of 7 {min(ts)*1e3:.1f} ms = {min(ts)/longest*1e6:.0f} us/step")
