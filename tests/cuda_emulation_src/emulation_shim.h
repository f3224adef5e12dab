#pragma once
// The CUDA features beam_search_kernels.cu uses, for the CPU: one std::thread per CUDA thread.
#include <math.h>
#include <string.h>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>
#define __CUDACC__ 1
#define __CUDA_ARCH__ 800
#define __host__
#define __device__
#define __forceinline__ inline
#define __global__
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(n)
struct Dim { unsigned x = 0, y = 0, z = 0; };
inline thread_local Dim threadIdx, blockIdx, blockDim;
struct alignas(4) char4 { signed char x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };
inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline float emu_half_to_float(unsigned short h) {
    const int exponent = (h >> 10) & 31, mantissa = h & 1023;
    float f = exponent == 0 ? ldexpf((float)mantissa, -24)
            : exponent == 31 ? (mantissa ? NAN : INFINITY) : ldexpf((float)(mantissa | 1024), exponent - 25);
    return (h >> 15) ? -f : f;
}
class Barrier {
  public:
    explicit Barrier(int count) : count_(count) {}
    void wait() {
        std::unique_lock<std::mutex> lock(mutex_);
        const long generation = generation_;
        if (++arrived_ == count_) {
            arrived_ = 0;
            ++generation_;
            done_.notify_all();
        } else {
            done_.wait(lock, [&] { return generation != generation_; });
        }
    }
  private:
    std::mutex mutex_;
    std::condition_variable done_;
    int count_, arrived_ = 0;
    long generation_ = 0;
};
struct Block {
    std::unique_ptr<Barrier> block;
    std::vector<std::unique_ptr<Barrier>> warps;
    float floats[32][32];
    unsigned flags[32][32];
};
inline Block* current_block;
inline void __syncthreads() { current_block->block->wait(); }
inline float __shfl_xor_sync(unsigned, float value, int offset) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    current_block->floats[warp][lane] = value;
    current_block->warps[warp]->wait();
    const float other = current_block->floats[warp][lane ^ offset];
    current_block->warps[warp]->wait();
    return other;
}
inline unsigned __ballot_sync(unsigned, bool predicate) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    current_block->flags[warp][lane] = predicate;
    current_block->warps[warp]->wait();
    unsigned bits = 0;
    for (int j = 0; j < 32; ++j) bits |= (current_block->flags[warp][j] ? 1u : 0u) << j;
    current_block->warps[warp]->wait();
    return bits;
}
inline void launch(int grid, int threads, const std::function<void()>& kernel) {
    for (int b = 0; b < grid; ++b) {  // blocks one after the other: __shared__ is a static
        Block block;
        block.block = std::make_unique<Barrier>(threads);
        for (int w = 0; w < threads / 32; ++w) block.warps.push_back(std::make_unique<Barrier>(32));
        current_block = &block;
        std::vector<std::thread> workers;
        for (int t = 0; t < threads; ++t)
            workers.emplace_back([&, t, b] {
                threadIdx.x = t;
                blockIdx.x = b;
                blockDim.x = threads;
                kernel();
            });
        for (auto& worker : workers) worker.join();
    }
}
