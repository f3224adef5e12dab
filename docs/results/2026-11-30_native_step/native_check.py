"""Native (C++) against Python decoder step in the fast generator, same kernels otherwise: best of 3 decodes each,
hypotheses and scores compared. python native_check.py CKPT DATA BATCH SENTENCES"""
import sys, time, torch, logging
import fairseq_accel.plugin
from fairseq import checkpoint_utils
from fairseq.dataclass.configs import GenerationConfig
from fairseq_accel.tasks.accel_generation import AccelGenerationConfig, build_accel_generator
logging.getLogger("fairseq").setLevel(logging.WARNING)
ckpt, data, bsz, nsent = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(1)
models, _, task = checkpoint_utils.load_model_ensemble_and_task([ckpt], arg_overrides={"data": data})
model = models[0].eval()
task.load_dataset("test"); ds = task.dataset("test")
batches = [ds.collater([ds[i] for i in range(s, min(s + bsz, nsent))]) for s in range(0, nsent, bsz)]
stock = task.build_generator([model], GenerationConfig(beam=5, max_len_a=0, max_len_b=200))
fast = build_accel_generator(stock, [model], AccelGenerationConfig(accel_generator="fast", no_accel_fallback=True))
py = build_accel_generator(stock, [model], AccelGenerationConfig(accel_generator="fast", no_accel_fallback=True))
py.fast_decoder.native_step = False
def run(gen):
    t = time.perf_counter(); outs = []
    for b in batches: outs += task.inference_step(gen, [model], b)
    return time.perf_counter() - t, outs
with torch.no_grad():
    run(fast); run(py)
    best = {}
    for r in range(3):
        for name, gen in (("native", fast), ("python", py)):
            t, outs = run(gen); best[name] = min(best.get(name, 1e9), t); best[name + "_out"] = outs
a, b = best["native_out"], best["python_out"]
same = all(torch.equal(x["tokens"], y["tokens"]) and float(x["score"]) == float(y["score"]) for ha, hb in zip(a, b) for x, y in zip(ha, hb))
print(f"native {best['native']:.3f}s python {best['python']:.3f}s speedup {best['python']/best['native']:.2f} identical(tokens+scores) {same} native_step={fast.fast_decoder.native_step is not None and fast.fast_decoder.native_step is not False}")
