// Index arithmetic and per-element rules shared by the beam-search kernels (beam_search_kernels.cu).
//
// Everything here is a __host__ __device__ inline function without CUDA intrinsics, so that the same
// code compiles with NVRTC for the GPU and with a host C++ compiler for the CPU tests
// (tests/test_cuda_kernels.py builds it into a small shared library and calls it through ctypes).
//
// Layouts (all contiguous, row-major):
//   step tensors (x, q, out)   [N, H, D]            row r = b * beam + i
//   int8 K/V cache             [B, H, T_max, beam, D]
//   cache scales               [B, H, T_max, beam]  one float32 scale per head and token
//   beam indirection table     [B, beam, T_max]     slot of hypothesis (b, i)'s history at time t
#pragma once

#if !defined(__CUDACC__) && !defined(__CUDACC_RTC__)
#include <math.h>
#include <string.h>
#define __host__
#define __device__
#define __forceinline__ inline
#endif

#define FA_HD __host__ __device__ __forceinline__

// Limits the kernels are written for; cuda_kernels.py checks its inputs against the same numbers.
#define FA_MAX_HEAD_DIM 128
#define FA_MAX_STEPS 1024
#define FA_MAX_TOPK 64
#define FA_QUANT_LEVELS 127

namespace fa {

// ---- layouts --------------------------------------------------------------------------------------

FA_HD int row_batch(int row, int beam) { return row / beam; }
FA_HD int row_beam(int row, int beam) { return row % beam; }

// Offset of element [row, head, d] of an [N, H, D] step tensor.
FA_HD long long step_offset(int row, int head, int d, int num_heads, int head_dim) {
    return ((long long)row * num_heads + head) * head_dim + d;
}

// Offset of the scale of [b, head, t, slot] in a [B, H, T_max, beam] scale array.
FA_HD long long kv_scale_offset(int b, int head, int t, int slot, int num_heads, int max_steps, int beam) {
    return (((long long)b * num_heads + head) * max_steps + t) * beam + slot;
}

// Offset of element [b, head, t, slot, d] of a [B, H, T_max, beam, D] cache.
FA_HD long long kv_cache_offset(int b, int head, int t, int slot, int d, int num_heads, int max_steps, int beam,
                                int head_dim) {
    return kv_scale_offset(b, head, t, slot, num_heads, max_steps, beam) * head_dim + d;
}

// Offset of entry [b, i, t] of the [B, beam, T_max] indirection table.
FA_HD long long indir_offset(int b, int i, int t, int beam, int max_steps) {
    return ((long long)b * beam + i) * max_steps + t;
}

// ---- float helpers without intrinsics -------------------------------------------------------------

FA_HD float pos_inf() {
#if defined(__CUDA_ARCH__)
    return __int_as_float(0x7f800000);
#else
    return HUGE_VALF;
#endif
}
FA_HD bool is_nan(float x) { return x != x; }

FA_HD unsigned float_bits(float x) {
#if defined(__CUDA_ARCH__)
    return __float_as_uint(x);
#else
    unsigned bits;
    memcpy(&bits, &x, sizeof(bits));
    return bits;
#endif
}

// ---- int8 quantization ----------------------------------------------------------------------------

// 127 / absmax: the factor that maps the largest magnitude of a vector to level 127 (0 for a zero vector).
FA_HD float quant_inv_scale(float absmax) { return absmax > 0.f ? (float)FA_QUANT_LEVELS / absmax : 0.f; }

// absmax / 127: the float32 step between two levels, stored next to the int8 vector (0 for a zero vector).
FA_HD float quant_scale(float absmax) { return absmax > 0.f ? absmax / (float)FA_QUANT_LEVELS : 0.f; }

// rint(x * inv_scale) clamped to [-127, 127]; rintf rounds half to even like torch.round. NaN gives 0.
FA_HD int quant_level(float x, float inv_scale) {
    float y = rintf(x * inv_scale);
    y = y > (float)FA_QUANT_LEVELS ? (float)FA_QUANT_LEVELS : y;
    y = y < -(float)FA_QUANT_LEVELS ? -(float)FA_QUANT_LEVELS : y;
    return is_nan(y) ? 0 : (int)y;
}

// ---- log-sum-exp as a running (max, sum of exp(x - max)) pair -------------------------------------
//
// Any order of pushes and merges gives the same result up to rounding; a NaN anywhere makes the sum
// NaN (so the lse is NaN and every log-prob of the row becomes -inf, as after torch.log_softmax).

struct LseAcc {
    float max;
    float sum;
};

FA_HD LseAcc lse_empty() { return LseAcc{-pos_inf(), 0.f}; }

FA_HD LseAcc lse_push(LseAcc acc, float x) {
    if (x == -pos_inf()) return acc;  // exp(-inf) = 0, and it would turn max - x into NaN
    if (x > acc.max) {
        acc.sum = acc.sum * expf(acc.max - x) + 1.f;
        acc.max = x;
    } else {
        acc.sum += expf(x - acc.max);  // a NaN x lands here and poisons the sum
    }
    return acc;
}

FA_HD LseAcc lse_merge(LseAcc a, LseAcc b) {
    float m = a.max > b.max ? a.max : b.max;
    if (m == -pos_inf()) return LseAcc{m, a.sum + b.sum};  // both empty (or NaN sums to keep)
    float sa = a.sum == 0.f ? 0.f : a.sum * expf(a.max - m);
    float sb = b.sum == 0.f ? 0.f : b.sum * expf(b.max - m);
    return LseAcc{m, sa + sb};
}

FA_HD float lse_value(LseAcc acc) { return acc.max + logf(acc.sum); }

// ---- beam-search scores ---------------------------------------------------------------------------

enum EosMode { EOS_NORMAL = 0, EOS_FORBIDDEN = 1, EOS_ONLY = 2 };

// Score of token v for a hypothesis: its log-prob (logit - lse) after fairseq's rules (no pad, unk
// penalty, eos forbidden before the minimum length or forced at the maximum), plus the hypothesis'
// accumulated score. NaN becomes -inf, so a broken row can never win.
FA_HD float beam_token_score(float logit, float lse, float row_bias, int v, int pad_idx, int unk_idx, int eos_idx,
                             float unk_penalty, int eos_mode) {
    float lp = logit - lse;
    if (v == pad_idx) lp = -pos_inf();
    if (v == unk_idx) lp -= unk_penalty;
    if (eos_mode == EOS_FORBIDDEN && v == eos_idx) lp = -pos_inf();
    if (eos_mode == EOS_ONLY && v != eos_idx) lp = -pos_inf();
    if (is_nan(lp)) lp = -pos_inf();
    float score = lp + row_bias;
    return is_nan(score) ? -pos_inf() : score;
}

// ---- radix selection of the k-th largest float ----------------------------------------------------

// An unsigned key with the order of the floats: key(a) > key(b) iff a > b (for non-NaN a, b; -0 and +0
// share the key of +0, since they compare equal).
FA_HD unsigned float_order_key(float x) {
    if (x == 0.f) x = 0.f;
    unsigned bits = float_bits(x);
    return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// State of the most-significant-digit-first radix selection of the k-th largest key: the keys that
// agree with `prefix` on the bits of `mask` are still candidates, and the k-th largest is the
// `remaining`-th largest among them. After the four 8-bit passes, prefix is the k-th largest key itself
// and `remaining` says how many keys equal to it belong to the top k (the others are strictly larger).
struct RadixState {
    unsigned prefix;
    unsigned mask;
    int remaining;
};

FA_HD RadixState radix_start(int k) { return RadixState{0u, 0u, k}; }

FA_HD bool radix_is_candidate(RadixState s, unsigned key) { return (key & s.mask) == s.prefix; }

FA_HD int radix_digit(unsigned key, int shift) { return (int)((key >> shift) & 0xFFu); }

// One pass: given the histogram hist[256] of the digit at `shift` over the current candidates, keep the
// highest digit whose bin holds the remaining-th largest candidate.
FA_HD RadixState radix_step(RadixState s, const unsigned* hist, int shift) {
    int remaining = s.remaining;
    int digit = 0;
    for (int d = 255; d >= 0; --d) {
        if ((int)hist[d] >= remaining) {
            digit = d;
            break;
        }
        remaining -= (int)hist[d];
    }
    return RadixState{s.prefix | ((unsigned)digit << shift), s.mask | (0xFFu << shift), remaining};
}

}  // namespace fa
