"""Where the fast generator's time goes: per-phase timers around its decoder step, candidate step, finalisation,
advance and batch shrinking, beside stock in the same process; with a 7th argument, torch.profiler's op table.
    python profile_phases.py CKPT DATA BATCH SENTENCES THREADS KERNELS(auto|torch) [profile]"""
import sys, time, collections, torch, logging
import fairseq_accel.plugin
from fairseq import checkpoint_utils
from fairseq.dataclass.configs import GenerationConfig
from fairseq_accel.tasks.accel_generation import AccelGenerationConfig, build_accel_generator
from fairseq_accel.inference import fast_generator as fg
logging.getLogger("fairseq").setLevel(logging.WARNING)
ckpt, data, bsz, nsent, threads, kernels = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
torch.set_num_threads(threads)
models, _, task = checkpoint_utils.load_model_ensemble_and_task([ckpt], arg_overrides={"data": data})
model = models[0].eval()
task.load_dataset("test")
ds = task.dataset("test")
batches = [ds.collater([ds[i] for i in range(s, min(s + bsz, nsent))]) for s in range(0, nsent, bsz)]
stock = task.build_generator([model], GenerationConfig(beam=5, max_len_a=0, max_len_b=200))
fast = build_accel_generator(stock, [model], AccelGenerationConfig(accel_generator="fast", no_accel_fallback=True, accel_kernels=kernels))
times = collections.Counter()
def wrap(cls, name, key):
    orig = getattr(cls, name)
    def w(*a, **k):
        t = time.perf_counter(); r = orig(*a, **k); times[key] += time.perf_counter() - t; return r
    setattr(cls, name, w)
wrap(fg._BeamSearch, "_candidates", "candidates")
wrap(fg._BeamSearch, "_finalize", "finalize")
wrap(fg._BeamSearch, "_advance", "advance")
wrap(fg._BeamSearch, "_keep_sentences", "keep")
dec = fast.fast_decoder
orig_step = dec.step
def step(*a, **k):
    t = time.perf_counter(); r = orig_step(*a, **k); times["decoder step"] += time.perf_counter() - t; return r
dec.step = step
def run(gen):
    t = time.perf_counter(); n = 0
    for b in batches:
        out = task.inference_step(gen, [model], b); n += sum(len(h[0]["tokens"]) for h in out)
    return time.perf_counter() - t, n
with torch.no_grad():
    run(fast); run(stock)
    res = {}
    for r in range(3):
        for name, gen in (("stock", stock), ("fast", fast)):
            res.setdefault(name, []).append(run(gen))
    times.clear(); tf, n = run(fast)
print(f"batch {bsz} threads {threads} kernels {kernels}: stock {min(r[0] for r in res['stock']):.2f}s fast {min(r[0] for r in res['fast']):.2f}s ratio {min(r[0] for r in res['stock'])/min(r[0] for r in res['fast']):.2f} tokens {n}")
print("fast split:", {k: f"{v:.3f} ({v/tf*100:.0f}%)" for k, v in times.items()}, f"total {tf:.3f}")
if len(sys.argv) > 7:
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CPU]) as p:
        run(fast)
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
