// Int8 linear layers on CPU for the few rows of a decoding step: activations quantized to 7-bit levels with a
// calibrated scale, int8 weights packed once, int32 accumulation, float32 output
//
//     y[m, n] = (sum_k q[m, k] * w[n, k] - z * sum_k w[n, k]) * scale[n] + bias[n],
//     q = clamp(nearbyint(x * (1 / input_scale)), -z, 127 - z) + z,  scale[n] = row_scale[n] * input_scale
//
// (fairseq_accel/modules/int8_linear.py: the same levels and formula as its fbgemm and emulated paths). fbgemm's
// linear quantizes and packs the activations and computes their row offsets in separate passes on every call,
// ~30-40 us whatever the layer's size; at a step's 5-160 rows that overhead is most of an int8 layer's time. Here
// the activations are quantized into one small buffer and the weights, packed in 16-column x 4-byte blocks,
// are streamed once per tile of up to 4 rows: with AVX-512 VNNI one vpdpbusd multiplies-adds 16 columns x 4
// inputs, with AVX2 vpmaddubsw + vpmaddwd (7-bit activations keep vpmaddubsw's int16 pairs from saturating:
// 2 * 127 * 128 < 32768), elsewhere plain loops; the best the CPU supports is chosen once when the module loads.
#include "step_kernels.h"

#include <ATen/Parallel.h>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

namespace {

constexpr int64_t kBlockColumns = 16;  // columns per packed block
constexpr int64_t kGroup = 4;          // inputs per column in a block row (one int32 lane of vpdpbusd)
constexpr int64_t kBlockBytes = kBlockColumns * kGroup;
constexpr int kMaxTileRows = 6;  // AVX-512: 6 x 4 sums, 4 weights and the broadcast in 29 of its 32 registers
constexpr int kTileBlocks = 4;  // 64 columns per tile
constexpr int kMaxLevel = 127;  // 7-bit activations

int64_t round_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

// Where a tile's sums go: y[m, n] = (sum - offsets[n]) * scales[n] + bias[n] (max(0, y) with relu: a feed-forward
// layer's activation fused) into out (row stride ldo), for the
// tile's first `columns` columns (the rest are the packing's zero padding). The per-column arrays are padded to
// whole blocks, and all pointers start at the tile's first column.
struct Epilogue {
  const int32_t* offsets;
  const float* scales;
  const float* bias;
  float* out;
  int64_t ldo;
  int64_t columns;
  bool relu;
};

// out[m, n] for `rows` rows and the tile's `blocks` blocks, from q (uint8 rows of `groups` * 4 bytes) and w (the
// tile's first block; blocks of [groups][16][4] bytes).
using TileFunction = void (*)(const uint8_t* q, int64_t rows, int64_t groups, const int8_t* w, int64_t blocks,
                              const Epilogue& e);

void tile_baseline(const uint8_t* q, int64_t rows, int64_t groups, const int8_t* w, int64_t blocks,
                   const Epilogue& e) {
  for (int64_t m = 0; m < rows; ++m) {
    for (int64_t b = 0; b < blocks; ++b) {
      int32_t sums[kBlockColumns] = {0};
      const int8_t* block = w + b * groups * kBlockBytes;
      for (int64_t g = 0; g < groups; ++g) {
        const uint8_t* a = q + m * groups * kGroup + g * kGroup;
        const int8_t* row = block + g * kBlockBytes;
        for (int64_t c = 0; c < kBlockColumns; ++c)
          for (int64_t i = 0; i < kGroup; ++i) sums[c] += int32_t(a[i]) * int32_t(row[c * kGroup + i]);
      }
      for (int64_t c = 0; c < std::min(kBlockColumns, e.columns - b * kBlockColumns); ++c) {
        const int64_t n = b * kBlockColumns + c;
        const float y = static_cast<float>(sums[c] - e.offsets[n]) * e.scales[n] + e.bias[n];
        e.out[m * e.ldo + n] = e.relu ? std::max(y, 0.f) : y;
      }
    }
  }
}

#if defined(__GNUC__) && defined(__x86_64__)
// sum += a (unsigned bytes) . w (signed bytes), four products per int32 lane, in place. The intrinsic leaves GCC 12
// free to put the result in another register: it then copied every sum twice per step (32 register moves per 16
// vpdpbusd, half of VNNI's peak); the tied asm operand keeps each sum in its register.
__attribute__((target("avx512f,avx512bw,avx512vnni"), always_inline)) inline void dpbusd(__m512i& sum, __m512i a,
                                                                                       __m512i w) {
  asm("vpdpbusd %2, %1, %0" : "+v"(sum) : "v"(a), "v"(w));
}

// The sums live in one flat array, every loop over it unrolled: GCC then keeps them in registers (with a 2-D
// array it spilled them to the stack on every step). Multiply, then add in the epilogue: the emulated path's
// float formula, not a fused multiply-add (hence fp-contract off).
template <int Rows, int Blocks>
__attribute__((target("avx512f,avx512bw,avx512vnni"), optimize("fp-contract=off"))) void tile_vnni_fixed(
    const uint8_t* q, int64_t groups, const int8_t* w, const Epilogue& e) {
  __m512i sums[Rows * Blocks];
#pragma GCC unroll 32
  for (int i = 0; i < Rows * Blocks; ++i) sums[i] = _mm512_setzero_si512();
  const int64_t stride = groups * kBlockBytes;
  for (int64_t g = 0; g < groups; ++g) {
    __m512i weights[Blocks];
#pragma GCC unroll 8
    for (int b = 0; b < Blocks; ++b) weights[b] = _mm512_loadu_si512(w + b * stride + g * kBlockBytes);
#pragma GCC unroll 8
    for (int m = 0; m < Rows; ++m) {
      int32_t four;
      std::memcpy(&four, q + m * groups * kGroup + g * kGroup, sizeof(four));
      const __m512i a = _mm512_set1_epi32(four);
#pragma GCC unroll 8
      for (int b = 0; b < Blocks; ++b) dpbusd(sums[m * Blocks + b], a, weights[b]);
    }
  }
#pragma GCC unroll 8
  for (int b = 0; b < Blocks; ++b) {
    const int64_t first = b * kBlockColumns;
    const int64_t valid = std::min<int64_t>(kBlockColumns, e.columns - first);
    const __mmask16 keep = static_cast<__mmask16>((1u << valid) - 1u);
    const __m512i offsets = _mm512_loadu_si512(e.offsets + first);
    const __m512 scales = _mm512_loadu_ps(e.scales + first), bias = _mm512_loadu_ps(e.bias + first);
#pragma GCC unroll 8
    for (int m = 0; m < Rows; ++m) {
      const __m512 y = _mm512_cvtepi32_ps(_mm512_sub_epi32(sums[m * Blocks + b], offsets));
      __m512 z = _mm512_add_ps(_mm512_mul_ps(y, scales), bias);
      if (e.relu) z = _mm512_max_ps(z, _mm512_setzero_ps());
      _mm512_mask_storeu_ps(e.out + m * e.ldo + first, keep, z);
    }
  }
}

template <int Rows, int Blocks>
__attribute__((target("avx2"), optimize("fp-contract=off"))) void tile_avx2_fixed(const uint8_t* q, int64_t groups,
                                                                                 const int8_t* w, const Epilogue& e) {
  // each 64-byte block as two registers of 8 columns x 4 inputs
  constexpr int Halves = 2 * Blocks;
  __m256i sums[Rows * Halves];
#pragma GCC unroll 32
  for (int i = 0; i < Rows * Halves; ++i) sums[i] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t stride = groups * kBlockBytes;
  for (int64_t g = 0; g < groups; ++g) {
    __m256i weights[Halves];
#pragma GCC unroll 8
    for (int h = 0; h < Halves; ++h)
      weights[h] = _mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(w + (h / 2) * stride + g * kBlockBytes + (h % 2) * 32));
#pragma GCC unroll 8
    for (int m = 0; m < Rows; ++m) {
      int32_t four;
      std::memcpy(&four, q + m * groups * kGroup + g * kGroup, sizeof(four));
      const __m256i a = _mm256_set1_epi32(four);
#pragma GCC unroll 8
      for (int h = 0; h < Halves; ++h)
        sums[m * Halves + h] =
            _mm256_add_epi32(sums[m * Halves + h], _mm256_madd_epi16(_mm256_maddubs_epi16(a, weights[h]), ones));
    }
  }
#pragma GCC unroll 8
  for (int h = 0; h < Halves; ++h) {
    const int64_t first = h * 8;
    const int64_t valid = std::min<int64_t>(8, e.columns - first);
    if (valid <= 0) break;
    const __m256i offsets = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(e.offsets + first));
    const __m256 scales = _mm256_loadu_ps(e.scales + first), bias = _mm256_loadu_ps(e.bias + first);
#pragma GCC unroll 8
    for (int m = 0; m < Rows; ++m) {
      __m256 y = _mm256_add_ps(
          _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(sums[m * Halves + h], offsets)), scales), bias);
      if (e.relu) y = _mm256_max_ps(y, _mm256_setzero_ps());
      if (valid == 8) {
        _mm256_storeu_ps(e.out + m * e.ldo + first, y);
      } else {
        alignas(32) float lanes[8];
        _mm256_store_ps(lanes, y);
        std::memcpy(e.out + m * e.ldo + first, lanes, valid * sizeof(float));
      }
    }
  }
}

// The fixed-size tiles by (rows, blocks), filled once, and a loop over a tile of any size.
template <template <int, int> class Kernel, int MaxRows, int MaxBlocks>
struct TileTable {
  using Fixed = void (*)(const uint8_t*, int64_t, const int8_t*, const Epilogue&);
  Fixed table[MaxRows][MaxBlocks];
  template <int R, int B>
  void fill() {
    table[R - 1][B - 1] = &Kernel<R, B>::run;
    if constexpr (B < MaxBlocks) fill<R, B + 1>();
    else if constexpr (R < MaxRows) fill<R + 1, 1>();
  }
  TileTable() { fill<1, 1>(); }
  void operator()(const uint8_t* q, int64_t rows, int64_t groups, const int8_t* w, int64_t blocks,
                  const Epilogue& e) const {
    const int64_t stride = groups * kBlockBytes;
    for (int64_t b = 0; b < blocks; b += MaxBlocks) {
      for (int64_t m = 0; m < rows; m += MaxRows) {
        const int64_t first = b * kBlockColumns;
        const Epilogue part{e.offsets + first, e.scales + first, e.bias + first, e.out + m * e.ldo + first, e.ldo,
                            e.columns - first, e.relu};
        table[std::min<int64_t>(MaxRows, rows - m) - 1][std::min<int64_t>(MaxBlocks, blocks - b) - 1](
            q + m * groups * kGroup, groups, w + b * stride, part);
      }
    }
  }
};

template <int R, int B>
struct VnniKernel {
  static void run(const uint8_t* q, int64_t groups, const int8_t* w, const Epilogue& e) {
    tile_vnni_fixed<R, B>(q, groups, w, e);
  }
};
template <int R, int B>
struct Avx2Kernel {
  static void run(const uint8_t* q, int64_t groups, const int8_t* w, const Epilogue& e) {
    tile_avx2_fixed<R, B>(q, groups, w, e);
  }
};

// rows x blocks per tile: AVX-512 keeps 6 x 4 sums, 4 weights and the broadcast in its 32 registers (a beam of 5
// in one pass over the weights); AVX2 4 x 2 (one block) of its 16
const TileTable<VnniKernel, kMaxTileRows, kTileBlocks> vnni_tiles;
const TileTable<Avx2Kernel, 4, 1> avx2_tiles;

void tile_vnni(const uint8_t* q, int64_t rows, int64_t groups, const int8_t* w, int64_t blocks, const Epilogue& e) {
  vnni_tiles(q, rows, groups, w, blocks, e);
}
void tile_avx2(const uint8_t* q, int64_t rows, int64_t groups, const int8_t* w, int64_t blocks, const Epilogue& e) {
  avx2_tiles(q, rows, groups, w, blocks, e);
}
#endif

// q[i] = clamp(nearbyint(x[i] * inverse), low, high) + zero point, inverse = the float32 1 / input scale (a product
// and round-half-even in every variant, so all give the same levels; a division's throughput made quantizing a
// 640-wide input cost as much as its GEMM).
using QuantizeFunction = void (*)(const float* x, int64_t n, float inverse, float low, float high, int32_t zero_point,
                                  uint8_t* q);

void quantize_baseline(const float* x, int64_t n, float inverse, float low, float high, int32_t zero_point,
                       uint8_t* q) {
  for (int64_t i = 0; i < n; ++i)
    q[i] = static_cast<uint8_t>(static_cast<int>(std::min(std::max(std::nearbyint(x[i] * inverse), low), high)) +
                                zero_point);
}

#if defined(__GNUC__) && defined(__x86_64__)
__attribute__((target("avx512f"))) void quantize_avx512(const float* x, int64_t n, float inverse, float low,
                                                        float high, int32_t zero_point, uint8_t* q) {
  const __m512 s = _mm512_set1_ps(inverse), lo = _mm512_set1_ps(low), hi = _mm512_set1_ps(high);
  const __m512i z = _mm512_set1_epi32(zero_point);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 level = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_loadu_ps(x + i), s),
                                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512i shifted = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(level, lo), hi)), z);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), _mm512_cvtepi32_epi8(shifted));
  }
  quantize_baseline(x + i, n - i, inverse, low, high, zero_point, q + i);
}

__attribute__((target("avx2"))) void quantize_avx2(const float* x, int64_t n, float inverse, float low, float high,
                                                   int32_t zero_point, uint8_t* q) {
  const __m256 s = _mm256_set1_ps(inverse), lo = _mm256_set1_ps(low), hi = _mm256_set1_ps(high);
  const __m256i z = _mm256_set1_epi32(zero_point);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 level = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), s),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i shifted = _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(level, lo), hi)), z);
    const __m128i words = _mm_packus_epi32(_mm256_castsi256_si128(shifted), _mm256_extracti128_si256(shifted, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + i), _mm_packus_epi16(words, words));
  }
  quantize_baseline(x + i, n - i, inverse, low, high, zero_point, q + i);
}
#endif

// An instruction set's tile and quantization functions.
struct Kernels {
  const char* isa;
  TileFunction tile;
  QuantizeFunction quantize;
};

bool cpu_supports(const std::string& isa) {
#if defined(__GNUC__) && defined(__x86_64__)
  __builtin_cpu_init();
  if (isa == "avx512-vnni")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vnni");
  if (isa == "avx2") return __builtin_cpu_supports("avx2");
#endif
  return isa == "baseline";
}

// The kernels of `isa` (avx512-vnni, avx2, baseline), or an error naming what this CPU supports.
Kernels kernels_for(const std::string& isa) {
  TORCH_CHECK(cpu_supports(isa), "int8 GEMM: this CPU (or build) does not support '", isa,
              "'; supported: avx512-vnni, avx2 or baseline where the CPU has them");
#if defined(__GNUC__) && defined(__x86_64__)
  if (isa == "avx512-vnni") return {"avx512-vnni", tile_vnni, quantize_avx512};
  if (isa == "avx2") return {"avx2", tile_avx2, quantize_avx2};
#endif
  return {"baseline", tile_baseline, quantize_baseline};
}

// The best the CPU supports, chosen once when the module loads.
const Kernels best = kernels_for(cpu_supports("avx512-vnni") ? "avx512-vnni"
                                 : cpu_supports("avx2")      ? "avx2"
                                                             : "baseline");

}  // namespace

Int8Weights::Int8Weights(const torch::Tensor& levels, const torch::Tensor& scales, std::optional<torch::Tensor> bias,
                         double input_scale, int64_t zero_point)
    : out_features(levels.size(0)),
      in_features(levels.size(1)),
      scales(scales.contiguous()),
      bias(std::move(bias)),
      inverse_scale(static_cast<float>(1.0 / input_scale)),
      zero_point(zero_point) {
  TORCH_CHECK(levels.device().is_cpu() && levels.scalar_type() == torch::kInt8 && levels.dim() == 2,
              "int8 weights must be an int8 CPU tensor [out, in]");
  TORCH_CHECK(this->scales.scalar_type() == torch::kFloat32 && this->scales.numel() == out_features,
              "int8 weights need one float32 scale per output");
  TORCH_CHECK(!this->bias || (this->bias->scalar_type() == torch::kFloat32 && this->bias->numel() == out_features),
              "the bias of int8 weights must be float32 with one value per output");
  TORCH_CHECK(input_scale > 0 && zero_point >= 0 && zero_point <= kMaxLevel, "bad input quantizer");
  if (this->bias) this->bias = this->bias->contiguous();
  const int64_t groups = round_up(in_features, kGroup) / kGroup;
  const int64_t blocks = round_up(out_features, kBlockColumns) / kBlockColumns;
  packed = torch::zeros({blocks, groups, kBlockBytes}, torch::kInt8);
  offsets = torch::zeros({blocks * kBlockColumns}, torch::kInt32);
  // the epilogue's per-column factors, padded to whole blocks (a missing bias adds zeros)
  padded_scales = torch::zeros({blocks * kBlockColumns}, torch::kFloat32);
  padded_scales.narrow(0, 0, out_features).copy_(this->scales.reshape({-1}));
  padded_bias = torch::zeros({blocks * kBlockColumns}, torch::kFloat32);
  if (this->bias) padded_bias.narrow(0, 0, out_features).copy_(this->bias->reshape({-1}));
  const auto source = levels.contiguous();
  const int8_t* w = source.data_ptr<int8_t>();
  int8_t* p = packed.data_ptr<int8_t>();
  int32_t* o = offsets.data_ptr<int32_t>();
  for (int64_t n = 0; n < out_features; ++n) {
    int32_t sum = 0;
    for (int64_t k = 0; k < in_features; ++k) {
      const int8_t value = w[n * in_features + k];
      p[((n / kBlockColumns) * groups + k / kGroup) * kBlockBytes + (n % kBlockColumns) * kGroup + k % kGroup] = value;
      sum += value;
    }
    o[n] = static_cast<int32_t>(zero_point) * sum;  // what the zero point adds to the products
  }
}

torch::Tensor Int8Weights::run(const torch::Tensor& input, const std::string& isa, bool relu,
                               const std::optional<torch::Tensor>& given_out) const {
  const Kernels kernels = isa.empty() ? best : kernels_for(isa);
  TORCH_CHECK(input.device().is_cpu() && input.scalar_type() == torch::kFloat32 && input.dim() == 2 &&
                  input.size(1) == in_features,
              "int8 linear: input must be a float32 CPU tensor [rows, ", in_features, "]");
  const auto x = input.contiguous();
  const int64_t rows = x.size(0), groups = packed.size(1), blocks = packed.size(0);
  const int64_t padded_in = groups * kGroup;
  // the activation levels: a per-thread buffer reused from call to call (a torch allocation and memset cost as
  // much as a small layer's GEMM); the padding inputs beyond in_features meet zero weights, but are set to 0
  thread_local std::vector<uint8_t> buffer;
  buffer.resize(rows * padded_in);
  auto out = output_of(given_out, {rows, out_features}, "int8 linear");
  const float* xp = x.data_ptr<float>();
  uint8_t* qp = buffer.data();
  const float low = static_cast<float>(-zero_point), high = static_cast<float>(kMaxLevel - zero_point);
  for (int64_t m = 0; m < rows; ++m) {
    kernels.quantize(xp + m * in_features, in_features, inverse_scale, low, high, static_cast<int32_t>(zero_point),
                     qp + m * padded_in);
    std::fill(qp + m * padded_in + in_features, qp + (m + 1) * padded_in, uint8_t{0});
  }
  const int8_t* wp = packed.data_ptr<int8_t>();
  const Epilogue all{offsets.data_ptr<int32_t>(), padded_scales.data_ptr<float>(), padded_bias.data_ptr<float>(),
                     out.data_ptr<float>(), out_features, out_features, relu};
  // columns split between threads in whole tiles: each thread streams its share of the weights once (a small
  // layer at a step's few rows stays on this thread: parallel_grain)
  const int64_t grain = std::max<int64_t>(kTileBlocks, parallel_grain(rows * groups * kBlockBytes));
  at::parallel_for(0, blocks, grain, [&](int64_t first, int64_t last) {
    const int64_t column = first * kBlockColumns;
    const Epilogue part{all.offsets + column, all.scales + column, all.bias + column, all.out + column, all.ldo,
                        all.columns - column, all.relu};
    kernels.tile(qp, rows, groups, wp + first * groups * kBlockBytes, last - first, part);
  });
  return out;
}

void register_int8_gemm(pybind11::module_& m) {
  namespace py = pybind11;
  py::class_<Int8Weights, std::shared_ptr<Int8Weights>>(
      m, "Int8Weights", "an int8 linear layer's weights packed for the CPU int8 GEMM (7-bit activations)")
      .def(py::init<torch::Tensor, torch::Tensor, std::optional<torch::Tensor>, double, int64_t>(), py::arg("levels"),
           py::arg("scales"), py::arg("bias"), py::arg("input_scale"), py::arg("zero_point"))
      .def("__call__", &Int8Weights::operator(), kNoGil, py::arg("input"))
      .def("run", &Int8Weights::run, kNoGil, py::arg("input"), py::arg("isa"), py::arg("relu") = false,
           py::arg("out") = py::none(),
           "the layer on the kernels of `isa` (avx512-vnni, avx2, baseline) where the CPU has them, max(0, y) with "
           "relu, into `out` where given");
  m.def("int8_gemm_isa", [] { return std::string(best.isa); },
        "the instruction set the int8 GEMM runs on: avx512-vnni, avx2 or baseline");
}
