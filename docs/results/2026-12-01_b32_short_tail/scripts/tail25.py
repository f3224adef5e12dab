import os, sys, argparse, time, torch
from fairseq_accel import benchmarking as B
torch.set_num_threads(int(sys.argv[1])); reps = int(sys.argv[2])
args = argparse.Namespace(path="/work/nmt_exp/tf_mini/c_int8.pt", data="/work/main/egs/mini_l10n/nmt/data/bin_unigram8000", config_yaml="config.yaml", gen_subset="test", max_sentences=64, remove_bpe="sentencepiece", beam=5, max_len_a=0, max_len_b=200, int8_min_weights=0, task=None)
task, models = B.load_checkpoint(args)
int8 = B.take_int8_model(task, models, 0)
task.load_dataset("test")
work = B.build_workload(args, 1, task, models, int8)
gen = B._fairseq_generator(work, "fast-w8a8-kv8")
batch = [b for b in work.batches if b["id"].item() == 25][0]
work.task.inference_step(gen, work.models, batch)
print("pid", os.getpid(), flush=True)
t = time.perf_counter()
for _ in range(reps): work.task.inference_step(gen, work.models, batch)
print("per decode ms", (time.perf_counter() - t) / reps * 1e3)
