#!/usr/bin/env bash
# Check the beam-search CUDA kernels on a GPU machine in one call, from a checkout (fairseq not needed):
#   bash scripts/gpu_kernel_check.sh        # PYTHON=python3.12 bash scripts/gpu_kernel_check.sh
# Needs torch with CUDA, cupy-cudaXXx matching the driver, numpy and pytest. Prints the devices and
# versions, compiles the kernels for this GPU's architecture, runs the tests marked gpu, then times the
# kernels against their torch equivalents. Every step runs; the exit status is that of the last failing one.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
status=0
LOAD_KERNELS='import importlib.util, sys
spec = importlib.util.spec_from_file_location("cuda_kernels", "fairseq_accel/inference/cuda_kernels.py")
ck = importlib.util.module_from_spec(spec); sys.modules[spec.name] = ck; spec.loader.exec_module(ck)'

echo "== devices"
nvidia-smi -L || status=$?

echo "== versions"
"$PYTHON" - <<'EOF' || status=$?
import sys, numpy, torch, cupy
print(f"python {sys.version.split()[0]} | torch {torch.__version__} (CUDA {torch.version.cuda}) | "
      f"cupy {cupy.__version__} | numpy {numpy.__version__}")
print(f"device 0: {torch.cuda.get_device_name(0)}, compute capability {torch.cuda.get_device_capability(0)}")
EOF

echo "== NVRTC compile for this device"
"$PYTHON" - <<EOF || status=$?
$LOAD_KERNELS
import torch
ck.require_cuda_kernels()  # says why, where the GPU tests below would all be skipped
arch = "compute_%d%d" % torch.cuda.get_device_capability(0)
ptx = ck.compile_to_ptx(arch)
print(f"NVRTC {ck.nvrtc_version()}, {arch}:", {name: f"{len(text)} chars of PTX" for name, text in ptx.items()})
EOF

echo "== tests marked gpu"
"$PYTHON" -m pytest -p no:cacheprovider --noconftest -m gpu tests/test_cuda_kernels.py -v -rs || status=$?

echo "== timings (microseconds per call, launch overhead included: CUDA events, mean of 100 after warm-up)"
"$PYTHON" - <<EOF || status=$?
$LOAD_KERNELS
import torch

def time_us(function, repeats=100):
    function()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        function()
    end.record()
    torch.cuda.synchronize()
    return 1000 * start.elapsed_time(end) / repeats

batch, beam, heads, head_dim, max_steps, n_steps, vocab = 32, 5, 8, 64, 256, 200, 32000
rows = batch * beam
logits, bias = torch.randn(rows, vocab, device="cuda"), torch.randn(rows, device="cuda")

def torch_topk():
    lp = torch.log_softmax(logits, -1)
    lp[:, 1] = float("-inf")
    lp[:, 3] -= 0.5
    return (lp + bias[:, None]).topk(2 * beam, dim=-1)

print(f"log_softmax_topk  N={rows} V={vocab} k={2 * beam}: "
      f"{time_us(lambda: ck.log_softmax_topk(logits, bias, 2 * beam, 1, 3, 2, 0.5)):.1f} "
      f"(torch log_softmax + mask + topk: {time_us(torch_topk):.1f})")

cache_shape = (batch, heads, max_steps, beam, head_dim)
k_cache, v_cache = (torch.randint(-127, 128, cache_shape, dtype=torch.int8, device="cuda") for _ in range(2))
k_scale, v_scale = (torch.rand(cache_shape[:4], device="cuda") * 0.01 for _ in range(2))
indir = torch.randint(0, beam, (batch, beam, max_steps), dtype=torch.int32, device="cuda")
q = torch.randn(rows, heads, head_dim, device="cuda") * head_dim**-0.5
k_float, v_float = (torch.randn(rows, heads, n_steps, head_dim, device="cuda") for _ in range(2))
sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k_float, v_float, scale=1.0)
print(f"int8_cache_attention  N={rows} H={heads} D={head_dim} n={n_steps}: "
      f"{time_us(lambda: ck.int8_cache_attention(q, k_cache, v_cache, k_scale, v_scale, indir, n_steps)):.1f} "
      f"(torch SDPA on a float32 cache without indirection: {time_us(sdpa):.1f})")
x = torch.randn(rows, heads, head_dim, device="cuda")
print(f"quantize_write  N={rows} H={heads} D={head_dim}: {time_us(lambda: ck.quantize_write(x, k_cache, k_scale, 7)):.1f}")
EOF
exit $status
