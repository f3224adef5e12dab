"""The plugin's int8 GEMM (Int8Linear on the C++ extension) against float32 addmm on a pre-transposed weight and
fbgemm's int8 linear, at a decoding step's row counts; outputs checked against the layer's float emulation.
    python gemm_shapes.py THREADS"""
import sys
import time

import torch

from fairseq_accel.inference import cpu_kernels
from fairseq_accel.modules.int8_linear import Int8Linear

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
print(f"int8 GEMM instruction set: {cpu_kernels._cpu_kernels.int8_gemm_isa()}, threads {torch.get_num_threads()}")


def microseconds(call, repeats: int = 300) -> float:
    """Median of 5 rounds of ``repeats`` calls, in us per call."""
    call(), call()
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            call()
        rounds.append((time.perf_counter() - start) / repeats * 1e6)
    return sorted(rounds)[2]


print("| in x out | rows | fp32 addmm us | fbgemm int8 us | own int8 us | own x fp32 | own = emulation |")
print("|---|---|---|---|---|---|---|")
torch.manual_seed(0)
for inputs, outputs in ((160, 160), (160, 480), (160, 640), (640, 160), (256, 1024), (1024, 256), (160, 8000),
                        (256, 8000)):
    linear = torch.nn.Linear(inputs, outputs)
    layer = Int8Linear.from_linear(linear, 8, 0.05)
    weight_t, bias = linear.weight.detach().t().contiguous(), linear.bias.detach()
    own = layer.native_weights()
    fbgemm = Int8Linear.from_linear(linear, 8, 0.05)
    fbgemm.native_weights = lambda: None
    for rows in (5, 40, 160):
        x = torch.randn(rows, inputs) * 2
        emulation = layer._rescaled(layer.quantize_input(x) @ layer.levels.float().t())
        fp32, fb, mine = (microseconds(lambda: torch.addmm(bias, x, weight_t)), microseconds(lambda: fbgemm(x)),
                          microseconds(lambda: own(x)))
        print(f"| {inputs}x{outputs} | {rows} | {fp32:.1f} | {fb:.1f} | {mine:.1f} | {fp32 / mine:.2f} | "
              f"{'yes' if torch.equal(own(x), emulation) else 'NO'} |")
