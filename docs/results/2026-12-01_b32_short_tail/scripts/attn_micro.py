"""level_cache_attention_step alone, 1 thread, best of 7 x 300 calls: attn_micro.py SENTENCES STEP shared|random
(4 heads of 40, beam 5; shared: the beams' slot histories are one sentence's until the last 3 steps)."""
import sys
import time

import torch

from fairseq_accel.inference import cpu_kernels

torch.manual_seed(0)
batch, heads, dim, beam, steps = int(sys.argv[1]), 4, 40, 5, 201
step, shared = int(sys.argv[2]), sys.argv[3] == "shared"
keys = torch.randint(-127, 128, (batch, heads, steps, beam, dim), dtype=torch.int8)
values = torch.randint(-127, 128, (batch, heads, steps, beam, dim), dtype=torch.int8)
q, k, v = (torch.randn(batch * beam, heads, dim) for _ in range(3))
factors, level_steps = torch.full((3, heads, dim), 30.0), torch.full((3, heads, dim), 1 / 30.0)
table = torch.randint(0, beam, (batch, beam, steps))
if shared:
    common = torch.randint(0, beam, (batch, 1, steps)).expand(batch, beam, steps).clone()
    common[:, :, step - 3:] = table[:, :, step - 3:]
    table = common
torch.set_num_threads(1)


def attend():
    cpu_kernels.level_cache_attention_step(q, k, v, keys, values, factors, level_steps, table, step)


for _ in range(50):
    attend()
best = float("inf")
for _ in range(7):
    start = time.perf_counter()
    for _ in range(300):
        attend()
    best = min(best, (time.perf_counter() - start) / 300)
print(f"B={batch} step={step} {sys.argv[3]}: {best * 1e6:.1f} us")
