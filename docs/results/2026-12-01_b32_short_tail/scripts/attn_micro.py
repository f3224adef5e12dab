import sys, time, torch
from fairseq_accel.inference import cpu_kernels as C
torch.manual_seed(0)
B, H, D, beam, T = int(sys.argv[1]), 4, 40, 5, 201
step = int(sys.argv[2]); shared = sys.argv[3] == "shared"
keys = torch.randint(-127, 128, (B, H, T, beam, D), dtype=torch.int8)
values = torch.randint(-127, 128, (B, H, T, beam, D), dtype=torch.int8)
q, k, v = (torch.randn(B * beam, H, D) for _ in range(3))
factors = torch.full((3, H, D), 30.0); steps = torch.full((3, H, D), 1 / 30.0)
table = torch.randint(0, beam, (B, beam, T))
if shared:
    common = torch.randint(0, beam, (B, 1, T)).expand(B, beam, T).clone()
    common[:, :, step - 3:] = table[:, :, step - 3:]
    table = common
torch.set_num_threads(1)
for _ in range(50): C.level_cache_attention_step(q, k, v, keys, values, factors, steps, table, step)
best = 1e9
for _ in range(7):
    t = time.perf_counter()
    for _ in range(300): C.level_cache_attention_step(q, k, v, keys, values, factors, steps, table, step)
    best = min(best, (time.perf_counter() - t) / 300)
print(f"B={B} step={step} {sys.argv[3]}: {best*1e6:.1f} us")
