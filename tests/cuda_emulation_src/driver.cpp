// Entry point of the CPU emulation of the CUDA kernels (tests/cuda_emulation.py builds it): compiled next to
// a copy of fairseq_accel/kernels/beam_search_kernels.cu, named kernels.cu, with its local headers inlined
// and its float16 inline PTX replaced by emu_half_to_float.
#include <string>
#include <utility>
#include "emulation_shim.h"
#include "kernels.cu"

template <typename T>
T unpack(const unsigned long long* slot) {
    T value;
    memcpy(&value, slot, sizeof(T));
    return value;
}
template <typename... Params, size_t... I>
void call(void (*kernel)(Params...), const unsigned long long* slots, std::index_sequence<I...>) {
    kernel(unpack<Params>(slots + I)...);
}
// Check the argument count and sizes against the kernel's own signature, then launch it.
template <typename... Params>
int run(void (*kernel)(Params...), int grid, int block, int count, const int* sizes, const unsigned long long* slots) {
    const int expected[] = {(int)sizeof(Params)...};
    if (count != (int)sizeof...(Params)) return -2;
    for (int i = 0; i < count; ++i)
        if (sizes[i] != expected[i]) return 1 + i;
    launch(grid, block, [&] { call(kernel, slots, std::index_sequence_for<Params...>{}); });
    return 0;
}
// 0: launched; -1: no such kernel; -2: wrong argument count; i > 0: argument i-1 has the wrong size.
extern "C" int launch_kernel(const char* name, int grid, int block, int count, const int* sizes,
                             const unsigned long long* slots) {
    const std::string kernel(name);
    if (kernel == "fa_quantize_write_f32") return run(fa_quantize_write_f32, grid, block, count, sizes, slots);
    if (kernel == "fa_quantize_write_f16") return run(fa_quantize_write_f16, grid, block, count, sizes, slots);
    if (kernel == "fa_int8_cache_attention") return run(fa_int8_cache_attention, grid, block, count, sizes, slots);
    if (kernel == "fa_log_softmax_topk_i64") return run(fa_log_softmax_topk_i64, grid, block, count, sizes, slots);
    if (kernel == "fa_log_softmax_topk_i32") return run(fa_log_softmax_topk_i32, grid, block, count, sizes, slots);
    return -1;
}
