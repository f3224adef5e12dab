import time, statistics, torch, sys
import torch.nn.functional as F
torch.set_num_threads(1)
torch.manual_seed(0)

def make(in_f, out_f):
    w = torch.randn(out_f, in_f) * 0.05
    b = torch.randn(out_f) * 0.1
    scales = w.abs().amax(1) / 127
    q = torch.clamp(torch.round(w / scales[:, None]), -127, 127).to(torch.int8)
    qw = torch._make_per_channel_quantized_tensor(q, scales.double(), torch.zeros(out_f, dtype=torch.long), 0)
    packs = {}
    for eng in ['fbgemm', 'onednn']:
        torch.backends.quantized.engine = eng
        packs[eng] = torch.ops.quantized.linear_prepack(qw, b)
    onednn_w = torch.ops.onednn.qlinear_prepack(q, None)
    return w, b, q, scales, packs, onednn_w

def bench(fn, reps=30):
    fn(); fn()
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(reps): fn()
        ts.append((time.perf_counter() - t) / reps)
    return statistics.median(ts)

shapes = [(256, 256), (256, 768), (256, 1024), (1024, 256), (256, 8000)]
rows_list = [int(r) for r in sys.argv[1:]] or [1, 5, 10, 40, 160, 640]
for in_f, out_f in shapes:
    w, b, q, scales, packs, onednn_w = make(in_f, out_f)
    wt = w.t().contiguous()
    for rows in rows_list:
        x = torch.randn(rows, in_f)
        xs = float(x.abs().max() / 127)
        cands = {
            'fp32_linear': lambda: F.linear(x, w, b),
            'fp32_addmm_t': lambda: torch.addmm(b, x, wt),
            'fbgemm_static_fp32out': lambda: torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(x, xs, 0, packs['fbgemm']),
            'fbgemm_dyn': lambda: torch.ops.quantized.linear_dynamic(x, packs['fbgemm']),
            'onednn_dyn': lambda: torch.ops.quantized.linear_dynamic(x, packs['onednn']),
            'onednn_pointwise': lambda: torch.ops.onednn.qlinear_pointwise(
                torch.clamp(torch.round(x / xs), -128, 127).to(torch.int8) if False else torch.quantize_per_tensor(x, xs, 128, torch.quint8).int_repr(),
                xs, 128, onednn_w, scales, torch.zeros(out_f, dtype=torch.long), b, 1.0, 0, torch.float32, 'none', [], ''),
        }
        res = {}
        for _ in range(2):
            for k, f in cands.items():
                try:
                    res.setdefault(k, []).append(bench(f))
                except Exception as e:
                    res[k] = [float('nan')]; print(k, 'ERR', str(e)[:100])
        base = min(res['fp32_linear'])
        print(f"{in_f}x{out_f} rows {rows:4d} fp32 {base*1e6:8.1f}us  " + "  ".join(f"{k} {base/min(v):.2f}" for k, v in res.items() if k != 'fp32_linear'), flush=True)
