#!/usr/bin/env bash
# GPU checks of the fast generator, in one call on a lent GPU machine, from a checkout:
#   bash scripts/gpu_generator_check.sh [WHEEL_DIR]
# 1. the kernel checks (scripts/gpu_kernel_check.sh: NVRTC for this device, tests marked gpu, kernel timings);
# 2. if fairseq is importable, or can be installed offline from WHEEL_DIR (ve-fairseq and its pure
#    dependencies as cp312 wheels), the generator's and the int8 linear layer's tests marked gpu and a side-by-side timing of stock
#    SequenceGenerator and the fast generator (fp32 / int8 cache) on a random 6-layer transformer on CUDA.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
wheels=${1:-}
status=0
bash scripts/gpu_kernel_check.sh || status=$?

if [ -n "${wheels}" ] && ! "$PYTHON" -c "import fairseq" 2>/dev/null; then
  echo "== installing fairseq offline from ${wheels}"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation "${wheels}"/*.whl "${wheels}"/*.tar.gz || status=$?
fi
if ! "$PYTHON" -c "import fairseq_accel.plugin" > /tmp/import.log 2>&1; then
  echo "== skipping the generator checks: fairseq_accel does not import here:"; tail -3 /tmp/import.log
  exit "${status}"
fi

echo "== generator and int8 linear (torch._int_mm) tests marked gpu"
"$PYTHON" -m pytest -p no:cacheprovider -m gpu tests/test_fast_generator.py tests/test_int8_linear.py -v -rs || status=$?

echo "== decoding timing on CUDA (random weights, beam 5, 40 steps; median of 5)"
"$PYTHON" - <<'PY' || status=$?
import statistics, sys, time
import torch
sys.path.insert(0, "tests")
import fairseq_accel.plugin  # noqa: F401
from fairseq.sequence_generator import SequenceGenerator
from model_builders import build_translation_model, toy_dictionary
from fairseq_accel.tasks.accel_generation import AccelGenerationConfig, build_accel_generator

dictionary = toy_dictionary(8000)
model = build_translation_model("transformer", dictionary, encoder_layers=6, decoder_layers=6).cuda()
for batch in (1, 32):
    src = torch.randint(dictionary.nspecial, len(dictionary), (batch, 30), device="cuda")
    sample = {"net_input": {"src_tokens": src, "src_lengths": torch.full((batch,), 30, device="cuda")}}
    stock = SequenceGenerator([model], dictionary, beam_size=5, max_len_b=40, min_len=40)
    speeds = {}
    for name, dtype in (("stock", None), ("fast", "fp32"), ("fast-int8", "int8")):
        gen = stock if dtype is None else build_accel_generator(
            stock, [model], AccelGenerationConfig(accel_generator="fast", kv_cache_dtype=dtype, accel_kernels="cuda"))
        times = []
        for _ in range(6):
            torch.cuda.synchronize(); start = time.perf_counter()
            with torch.no_grad():
                out = gen.generate([model], sample)
            torch.cuda.synchronize(); times.append(time.perf_counter() - start)
        tokens = sum(len(h[0]["tokens"]) for h in out)
        speeds[name] = tokens / statistics.median(times[1:])
        print(f"batch {batch:3d} {name:10s} {speeds[name]:9.0f} tokens/s  x{speeds[name] / speeds['stock']:.2f}")
PY
exit "${status}"
