# 1 thread: fast int8 at batch B vs CTranslate2 int8 (1 translator, 1 thread, max_batch_size B), in turn
import os, sys, argparse, time, torch, json
from pathlib import Path
from fairseq_accel import benchmarking as B
bs = int(sys.argv[1]); reps = int(sys.argv[2]) if len(sys.argv) > 2 else 5
nsent = int(os.environ.get("NSENT", 64))
torch.set_num_threads(1)
args = argparse.Namespace(path="/work/nmt_exp/tf_mini/c_int8.pt", ct2_from="/work/nmt_exp/tf_mini/ckpt/checkpoint_best.pt", data="/work/main/egs/mini_l10n/nmt/data/bin_unigram8000", config_yaml="config.yaml", gen_subset="test", max_sentences=nsent, remove_bpe="sentencepiece", beam=5, max_len_a=0, max_len_b=200, int8_min_weights=0, task=None)
task, models = B.load_checkpoint(args)
int8 = B.take_int8_model(task, models, 0)
task.load_dataset("test")
work = B.build_workload(args, bs, task, models, int8)
gen = B._fairseq_generator(work, "fast-w8a8-kv8")
ct2dir = B._ct2_convert(args, work, "int8", Path("/tmp/ct2conv_ot"))
ct2 = B._ct2_runner(args, work, ct2dir, 1)
def fast():
    return B._run_fairseq(work, gen, work.batches)
res = {"fast": [], "ct2": []}
fast(); ct2(work.batches)
for _ in range(reps):
    for name, f in (("fast", fast), ("ct2", lambda: ct2(work.batches))):
        s, toks, _ = f(); res[name].append(s)
for k, v in res.items():
    print(k, "best %.4f median %.4f" % (min(v), sorted(v)[len(v)//2]))
print("fast/ct2 speed (best):", min(res["ct2"]) / min(res["fast"]))
