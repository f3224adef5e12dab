"""F.linear against addmm on a weight transposed once, at a decoding step's rows (1 thread): time and equality.
    python gemm_layout.py"""
import timeit

import torch
import torch.nn.functional as F

torch.set_num_threads(1)
for rows in (5, 160):
    for inputs, outputs in ((256, 256), (256, 768), (256, 1024), (1024, 256)):
        x, weight, bias = torch.randn(rows, inputs), torch.randn(outputs, inputs), torch.randn(outputs)
        weight_t = weight.t().contiguous()
        a, b = F.linear(x, weight, bias), torch.addmm(bias, x, weight_t)
        calls = 2000
        linear = timeit.timeit(lambda: F.linear(x, weight, bias), number=calls) / calls * 1e6
        addmm = timeit.timeit(lambda: torch.addmm(bias, x, weight_t), number=calls) / calls * 1e6
        print(f"rows {rows} {inputs}x{outputs}: F.linear {linear:.1f} us, addmm on W^T {addmm:.1f} us, "
              f"equal {torch.equal(a, b)}, largest difference {(a - b).abs().max().item():.1e}")
