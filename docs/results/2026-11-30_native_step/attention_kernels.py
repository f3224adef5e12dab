"""The C++ attention kernels at batch 32 x beam 5 (160 rows, 4 heads of 64): encoder memory of 20 positions, the
self-attention cache at steps 5/20/50; microseconds per call, 1 thread. python attention_kernels.py"""
import torch, time
from fairseq_accel.inference import cpu_kernels as ck
torch.set_num_threads(1)
def t(f, n=200):
    f(); f(); s=time.perf_counter()
    for _ in range(n): f()
    return (time.perf_counter()-s)/n*1e6
B, beam, H, D, S, T = 32, 5, 4, 64, 20, 60
q = torch.randn(B*beam, H, D); keys = torch.randn(B, H, S, D); values = torch.randn(B, H, S, D)
pad = torch.empty(0, dtype=torch.bool)
print("memory_attention 160 rows S=20: %.1f us" % t(lambda: ck.memory_attention(q, keys, values, pad, beam)))
kc = torch.randn(B, H, T, beam, D); vc = torch.randn(B, H, T, beam, D); table = torch.randint(0, beam, (B, beam, T))
for step in (5, 20, 50):
    print(f"cache_attention_step step {step}: %.1f us" % t(lambda: ck.cache_attention_step(q, q, q, kc, vc, table, step)))
q1 = torch.randn(5, H, D); k1 = torch.randn(1, H, S, D); v1 = torch.randn(1, H, S, D)
print("memory_attention 5 rows: %.1f us" % t(lambda: ck.memory_attention(q1, k1, v1, pad, beam)))
