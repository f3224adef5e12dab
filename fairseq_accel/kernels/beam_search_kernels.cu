// CUDA kernels of the fast beam-search generator, compiled at run time with NVRTC and launched by
// fairseq_accel/inference/cuda_kernels.py (which states the shapes and checks them before a launch).
//
//   fa_quantize_write_{f32,f16}       one decoding step's keys or values -> int8 cache + per-token scales
//   fa_int8_cache_attention           a step's queries over the int8 cache, through the beam indirection
//   fa_log_softmax_topk_{i64,i32}     log-softmax, fairseq's token rules and the top k of every hypothesis
//
// Layouts, limits and the per-element rules live in beam_search_common.cuh, which the CPU tests check.
#include "beam_search_common.cuh"

#define FA_WARP_SIZE 32
#define FA_FULL_MASK 0xffffffffu

#define FA_QUANT_WARPS 4  // (row, head) pairs per block of fa_quantize_write_*: one warp each
#define FA_ATTN_THREADS 128
#define FA_ATTN_WARPS (FA_ATTN_THREADS / FA_WARP_SIZE)
#define FA_TOPK_THREADS 256
#define FA_TOPK_WARPS (FA_TOPK_THREADS / FA_WARP_SIZE)

// ---- reductions -----------------------------------------------------------------------------------

struct MaxOp {
    __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct SumOp {
    __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};

template <typename Op>
__device__ __forceinline__ float warp_reduce(float v, Op op) {
    for (int offset = FA_WARP_SIZE / 2; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(FA_FULL_MASK, v, offset));
    return v;
}

__device__ __forceinline__ float warp_max(float v) { return warp_reduce(v, MaxOp()); }
__device__ __forceinline__ float warp_sum(float v) { return warp_reduce(v, SumOp()); }

// Block-wide reduction; every thread of the block must call it, and every thread gets the result.
// `scratch` holds one float per warp and is free again when the function returns.
template <int WARPS, typename Op>
__device__ __forceinline__ float block_reduce(float v, float* scratch, Op op) {
    v = warp_reduce(v, op);
    if (threadIdx.x % FA_WARP_SIZE == 0) scratch[threadIdx.x / FA_WARP_SIZE] = v;
    __syncthreads();
    float result = scratch[0];
    for (int w = 1; w < WARPS; ++w) result = op(result, scratch[w]);
    __syncthreads();
    return result;
}

// ---- a. quantize one step into the int8 cache -----------------------------------------------------

__device__ __forceinline__ float load_as_float(const float* p, long long i) { return p[i]; }

// float16 arrives as its raw 16 bits, so that no CUDA header is needed to convert it.
__device__ __forceinline__ float load_as_float(const unsigned short* p, long long i) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(p[i]));
    return f;
}

// x [N, H, D] -> cache[b, h, step, i, :] (int8) and scales[b, h, step, i], one warp per (row, head).
template <typename T>
__device__ __forceinline__ void quantize_write(const T* __restrict__ x, signed char* __restrict__ cache,
                                               float* __restrict__ scales, int batch, int beam, int num_heads,
                                               int max_steps, int head_dim, int step) {
    const int warp = threadIdx.x / FA_WARP_SIZE;
    const int lane = threadIdx.x % FA_WARP_SIZE;
    const long long pair = (long long)blockIdx.x * FA_QUANT_WARPS + warp;  // row * H + head
    if (blockDim.x != FA_QUANT_WARPS * FA_WARP_SIZE || pair >= (long long)batch * beam * num_heads || step < 0 ||
        step >= max_steps)
        return;  // the whole warp
    const int row = (int)(pair / num_heads);
    const int head = (int)(pair % num_heads);
    const int b = fa::row_batch(row, beam);
    const int i = fa::row_beam(row, beam);

    float absmax = 0.f;
    for (int d = lane; d < head_dim; d += FA_WARP_SIZE)
        absmax = fmaxf(absmax, fabsf(load_as_float(x, fa::step_offset(row, head, d, num_heads, head_dim))));
    absmax = warp_max(absmax);

    const float inv_scale = fa::quant_inv_scale(absmax);
    for (int d = lane; d < head_dim; d += FA_WARP_SIZE) {
        const float value = load_as_float(x, fa::step_offset(row, head, d, num_heads, head_dim));
        cache[fa::kv_cache_offset(b, head, step, i, d, num_heads, max_steps, beam, head_dim)] =
            (signed char)fa::quant_level(value, inv_scale);
    }
    if (lane == 0) scales[fa::kv_scale_offset(b, head, step, i, num_heads, max_steps, beam)] = fa::quant_scale(absmax);
}

extern "C" __global__ void __launch_bounds__(FA_QUANT_WARPS * FA_WARP_SIZE)
    fa_quantize_write_f32(const float* __restrict__ x, signed char* __restrict__ cache, float* __restrict__ scales,
                          int batch, int beam, int num_heads, int max_steps, int head_dim, int step) {
    quantize_write(x, cache, scales, batch, beam, num_heads, max_steps, head_dim, step);
}

extern "C" __global__ void __launch_bounds__(FA_QUANT_WARPS * FA_WARP_SIZE)
    fa_quantize_write_f16(const unsigned short* __restrict__ x, signed char* __restrict__ cache,
                          float* __restrict__ scales, int batch, int beam, int num_heads, int max_steps, int head_dim,
                          int step) {
    quantize_write(x, cache, scales, batch, beam, num_heads, max_steps, head_dim, step);
}

// ---- b. attention of one step over the int8 cache with beam indirection ---------------------------

// Dot product of q (shared memory, 16-byte aligned) with one int8 key row, over the lanes of a warp; the
// result is in every lane. `vectorized` (rows 4-byte aligned) reads 4 bytes per lane.
__device__ __forceinline__ float warp_dot_int8(const float* q, const signed char* __restrict__ key, int head_dim,
                                               bool vectorized, int lane) {
    float dot = 0.f;
    if (vectorized) {
        const char4* key4 = reinterpret_cast<const char4*>(key);
        const float4* q4 = reinterpret_cast<const float4*>(q);
        for (int j = lane; j < head_dim / 4; j += FA_WARP_SIZE) {
            const char4 k = key4[j];
            const float4 qv = q4[j];
            dot += qv.x * (float)k.x + qv.y * (float)k.y + qv.z * (float)k.z + qv.w * (float)k.w;
        }
    } else {
        for (int d = lane; d < head_dim; d += FA_WARP_SIZE) dot += q[d] * (float)key[d];
    }
    return warp_sum(dot);
}

// out[r, h, :] = sum_t softmax_t(q[r, h] . k_hat[t]) v_hat[t] for t < n_steps, where k_hat, v_hat of
// time t are read from beam slot indir[b, i, t] and dequantized with their per-token scales.
// One block per (row, head). A slot outside [0, beam) makes that (row, head)'s output NaN.
extern "C" __global__ void __launch_bounds__(FA_ATTN_THREADS)
    fa_int8_cache_attention(const float* __restrict__ q, const signed char* __restrict__ k_cache,
                            const signed char* __restrict__ v_cache, const float* __restrict__ k_scale,
                            const float* __restrict__ v_scale, const int* __restrict__ indir, float* __restrict__ out,
                            int batch, int beam, int num_heads, int max_steps, int head_dim, int n_steps) {
    __shared__ __align__(16) float q_s[FA_MAX_HEAD_DIM];
    __shared__ float weight_s[FA_MAX_STEPS];  // scores, then softmax weight times the V scale
    __shared__ int slot_s[FA_MAX_STEPS];
    __shared__ float partial_s[FA_ATTN_WARPS][FA_MAX_HEAD_DIM];
    __shared__ float scratch_s[FA_ATTN_WARPS];

    const int row = blockIdx.x / num_heads;
    const int head = blockIdx.x % num_heads;
    if (blockDim.x != FA_ATTN_THREADS || row >= batch * beam || head_dim > FA_MAX_HEAD_DIM || n_steps < 1 ||
        n_steps > max_steps || n_steps > FA_MAX_STEPS)
        return;  // the same for the whole block
    const int b = fa::row_batch(row, beam);
    const int i = fa::row_beam(row, beam);
    const int warp = threadIdx.x / FA_WARP_SIZE;
    const int lane = threadIdx.x % FA_WARP_SIZE;
    const float nan = __int_as_float(0x7fffffff);
    // rows start 4-byte aligned when the head dimension is a multiple of 4 and the caches are
    const bool k_vectorized = (head_dim & 3) == 0 && (reinterpret_cast<unsigned long long>(k_cache) & 3) == 0;
    const bool v_vectorized = (head_dim & 3) == 0 && (reinterpret_cast<unsigned long long>(v_cache) & 3) == 0;

    for (int d = threadIdx.x; d < head_dim; d += FA_ATTN_THREADS)
        q_s[d] = q[fa::step_offset(row, head, d, num_heads, head_dim)];
    __syncthreads();

    // 1. scores: one warp per time step, lanes along the head dimension
    for (int t = warp; t < n_steps; t += FA_ATTN_WARPS) {
        const int slot = indir[fa::indir_offset(b, i, t, beam, max_steps)];
        const bool valid = slot >= 0 && slot < beam;
        float dot = 0.f;
        if (valid)
            dot = warp_dot_int8(q_s, k_cache + fa::kv_cache_offset(b, head, t, slot, 0, num_heads, max_steps, beam, head_dim),
                                head_dim, k_vectorized, lane);
        if (lane == 0) {
            weight_s[t] = valid ? dot * k_scale[fa::kv_scale_offset(b, head, t, slot, num_heads, max_steps, beam)] : nan;
            slot_s[t] = valid ? slot : -1;
        }
    }
    __syncthreads();

    // 2. softmax over time (each thread rewrites only the entries it read), folded with the V scale
    float local_max = -fa::pos_inf();
    for (int t = threadIdx.x; t < n_steps; t += FA_ATTN_THREADS) local_max = fmaxf(local_max, weight_s[t]);
    const float score_max = block_reduce<FA_ATTN_WARPS>(local_max, scratch_s, MaxOp());
    float local_sum = 0.f;
    for (int t = threadIdx.x; t < n_steps; t += FA_ATTN_THREADS) {
        const float e = expf(weight_s[t] - score_max);  // NaN for an invalid slot, which poisons the sum
        weight_s[t] = e;
        local_sum += e;
    }
    const float inv_sum = 1.f / block_reduce<FA_ATTN_WARPS>(local_sum, scratch_s, SumOp());
    for (int t = threadIdx.x; t < n_steps; t += FA_ATTN_THREADS) {
        const int slot = slot_s[t];
        const float scale = slot >= 0 ? v_scale[fa::kv_scale_offset(b, head, t, slot, num_heads, max_steps, beam)] : nan;
        weight_s[t] *= inv_sum * scale;
    }
    __syncthreads();

    // 3. weighted sum of the int8 value rows: warps split the time steps, lanes the head dimension
    //    (4 consecutive elements per lane when the row length allows 4-byte reads, else a stride of 32)
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int t = warp; t < n_steps; t += FA_ATTN_WARPS) {
        const int slot = slot_s[t] < 0 ? 0 : slot_s[t];  // an invalid slot has a NaN weight: any row will do
        const float w = weight_s[t];
        const signed char* value = v_cache + fa::kv_cache_offset(b, head, t, slot, 0, num_heads, max_steps, beam, head_dim);
        if (v_vectorized) {
            if (4 * lane < head_dim) {
                const char4 v = reinterpret_cast<const char4*>(value)[lane];
                acc[0] += w * (float)v.x;
                acc[1] += w * (float)v.y;
                acc[2] += w * (float)v.z;
                acc[3] += w * (float)v.w;
            }
        } else {
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const int d = lane + FA_WARP_SIZE * c;
                if (d < head_dim) acc[c] += w * (float)value[d];
            }
        }
    }
#pragma unroll
    for (int c = 0; c < 4; ++c) {
        const int d = v_vectorized ? 4 * lane + c : lane + FA_WARP_SIZE * c;
        if (d < head_dim) partial_s[warp][d] = acc[c];
    }
    __syncthreads();
    for (int d = threadIdx.x; d < head_dim; d += FA_ATTN_THREADS) {
        float total = 0.f;
        for (int w = 0; w < FA_ATTN_WARPS; ++w) total += partial_s[w][d];
        out[fa::step_offset(row, head, d, num_heads, head_dim)] = total;
    }
}

// ---- c. log-softmax + top-k of every hypothesis ---------------------------------------------------

__device__ __forceinline__ fa::LseAcc warp_lse(fa::LseAcc acc) {
    for (int offset = FA_WARP_SIZE / 2; offset > 0; offset >>= 1) {
        fa::LseAcc other;
        other.max = __shfl_xor_sync(FA_FULL_MASK, acc.max, offset);
        other.sum = __shfl_xor_sync(FA_FULL_MASK, acc.sum, offset);
        acc = fa::lse_merge(acc, other);
    }
    return acc;
}

// One block per row: (1) lse of the row's logits, (2) the k-th largest score by a 4-pass radix
// selection over order-preserving 32-bit keys (256-bin shared-memory histograms), (3) a gather, in
// token order, of the scores above it and of the first ties equal to it, (4) a rank sort of those k.
template <typename Index>
__device__ __forceinline__ void log_softmax_topk(const float* __restrict__ logits, const float* __restrict__ row_bias,
                                                 float* __restrict__ values, Index* __restrict__ indices,
                                                 float* __restrict__ lse_out, int rows, int vocab, int k, int pad_idx,
                                                 int unk_idx, int eos_idx, float unk_penalty, int eos_mode) {
    __shared__ float lse_max_s[FA_TOPK_WARPS];
    __shared__ float lse_sum_s[FA_TOPK_WARPS];
    __shared__ unsigned hist_s[256];
    __shared__ fa::RadixState state_s;
    __shared__ int count_s[2][2][FA_TOPK_WARPS];  // [tile parity][above, tied][warp]
    __shared__ float cand_score_s[FA_MAX_TOPK];
    __shared__ int cand_token_s[FA_MAX_TOPK];

    const int row = blockIdx.x;
    if (blockDim.x != FA_TOPK_THREADS || row >= rows || k < 1 || k > FA_MAX_TOPK || k > vocab)
        return;  // the same for the whole block
    const int warp = threadIdx.x / FA_WARP_SIZE;
    const int lane = threadIdx.x % FA_WARP_SIZE;
    const float* x = logits + (long long)row * vocab;

    // 1. log-sum-exp over the whole vocabulary
    fa::LseAcc acc = fa::lse_empty();
    for (int v = threadIdx.x; v < vocab; v += FA_TOPK_THREADS) acc = fa::lse_push(acc, x[v]);
    acc = warp_lse(acc);
    if (lane == 0) {
        lse_max_s[warp] = acc.max;
        lse_sum_s[warp] = acc.sum;
    }
    if (threadIdx.x == 0) state_s = fa::radix_start(k);
    __syncthreads();
    fa::LseAcc total = fa::lse_empty();
    for (int w = 0; w < FA_TOPK_WARPS; ++w) total = fa::lse_merge(total, fa::LseAcc{lse_max_s[w], lse_sum_s[w]});
    const float lse = fa::lse_value(total);
    const float bias = row_bias[row];
    if (threadIdx.x == 0) lse_out[row] = lse;

    // 2. radix selection of the k-th largest score key, 8 bits per pass from the top
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int j = threadIdx.x; j < 256; j += FA_TOPK_THREADS) hist_s[j] = 0u;
        __syncthreads();
        const fa::RadixState state = state_s;
        for (int v = threadIdx.x; v < vocab; v += FA_TOPK_THREADS) {
            const unsigned key = fa::float_order_key(
                fa::beam_token_score(x[v], lse, bias, v, pad_idx, unk_idx, eos_idx, unk_penalty, eos_mode));
            if (fa::radix_is_candidate(state, key)) atomicAdd(&hist_s[fa::radix_digit(key, shift)], 1u);
        }
        __syncthreads();
        if (threadIdx.x == 0) state_s = fa::radix_step(state, hist_s, shift);
        __syncthreads();
    }
    const unsigned kth_key = state_s.prefix;
    const int n_tied = state_s.remaining;  // how many keys equal to kth_key are in the top k
    const int n_above = k - n_tied;        // exactly this many keys are larger

    // 3. gather the candidates: above -> [0, n_above), the first n_tied ties in token order -> after them.
    //    Positions come from warp ballots and per-warp counts; every thread keeps the same running totals,
    //    and the double-buffered counts need one barrier per tile.
    const unsigned lanes_below = (1u << lane) - 1u;
    int above_before_tile = 0;
    int tied_before_tile = 0;
    for (int start = 0, parity = 0; start < vocab; start += FA_TOPK_THREADS, parity ^= 1) {
        const int v = start + threadIdx.x;
        float score = 0.f;
        bool above = false;
        bool tied = false;
        if (v < vocab) {
            score = fa::beam_token_score(x[v], lse, bias, v, pad_idx, unk_idx, eos_idx, unk_penalty, eos_mode);
            const unsigned key = fa::float_order_key(score);
            above = key > kth_key;
            tied = key == kth_key;
        }
        const unsigned above_ballot = __ballot_sync(FA_FULL_MASK, above);
        const unsigned tied_ballot = __ballot_sync(FA_FULL_MASK, tied);
        if (lane == 0) {
            count_s[parity][0][warp] = __popc(above_ballot);
            count_s[parity][1][warp] = __popc(tied_ballot);
        }
        __syncthreads();
        int above_offset = above_before_tile + __popc(above_ballot & lanes_below);
        int tied_offset = tied_before_tile + __popc(tied_ballot & lanes_below);
        for (int w = 0; w < FA_TOPK_WARPS; ++w) {
            const int n_above_w = count_s[parity][0][w];
            const int n_tied_w = count_s[parity][1][w];
            if (w < warp) {
                above_offset += n_above_w;
                tied_offset += n_tied_w;
            }
            above_before_tile += n_above_w;
            tied_before_tile += n_tied_w;
        }
        if (above && above_offset < n_above) {
            cand_score_s[above_offset] = score;
            cand_token_s[above_offset] = v;
        }
        if (tied && tied_offset < n_tied) {
            cand_score_s[n_above + tied_offset] = score;
            cand_token_s[n_above + tied_offset] = v;
        }
        if (above_before_tile >= n_above && tied_before_tile >= n_tied) break;  // the same in every thread
    }
    __syncthreads();

    // 4. rank sort: score descending, then token id ascending
    if (threadIdx.x < k) {
        const float score = cand_score_s[threadIdx.x];
        const unsigned key = fa::float_order_key(score);
        const int token = cand_token_s[threadIdx.x];
        int rank = 0;
        for (int j = 0; j < k; ++j) {
            const unsigned other_key = fa::float_order_key(cand_score_s[j]);
            rank += other_key > key || (other_key == key && cand_token_s[j] < token);
        }
        values[(long long)row * k + rank] = score;
        indices[(long long)row * k + rank] = (Index)token;
    }
}

extern "C" __global__ void __launch_bounds__(FA_TOPK_THREADS)
    fa_log_softmax_topk_i64(const float* __restrict__ logits, const float* __restrict__ row_bias,
                            float* __restrict__ values, long long* __restrict__ indices, float* __restrict__ lse,
                            int rows, int vocab, int k, int pad_idx, int unk_idx, int eos_idx, float unk_penalty,
                            int eos_mode) {
    log_softmax_topk(logits, row_bias, values, indices, lse, rows, vocab, k, pad_idx, unk_idx, eos_idx, unk_penalty,
                     eos_mode);
}

extern "C" __global__ void __launch_bounds__(FA_TOPK_THREADS)
    fa_log_softmax_topk_i32(const float* __restrict__ logits, const float* __restrict__ row_bias,
                            float* __restrict__ values, int* __restrict__ indices, float* __restrict__ lse, int rows,
                            int vocab, int k, int pad_idx, int unk_idx, int eos_idx, float unk_penalty, int eos_mode) {
    log_softmax_topk(logits, row_bias, values, indices, lse, rows, vocab, k, pad_idx, unk_idx, eos_idx, unk_penalty,
                     eos_mode);
}
