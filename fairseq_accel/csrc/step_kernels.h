// The step kernels of beam_search_cpu.cpp and the int8 linear layer of int8_gemm_cpu.cpp that the native decoder
// step (decoder_step_cpu.cpp) calls, and the registration of those classes into the extension module.
#pragma once

#include <omp.h>
#include <torch/extension.h>

#include <algorithm>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

// Every binding of the extension releases the GIL while it runs: the fast generator decodes several shards of a
// batch in threads at once (a Python layer called back from the C++ step takes the GIL again).
inline constexpr auto kNoGil = pybind11::call_guard<pybind11::gil_scoped_release>();

// About how many multiply-adds a kernel's loop must hold before it is split between threads. A fork and join of
// OpenMP's threads costs ~1.5-2 us (a 160 x 160 int8 layer at 5 rows: 7.7 us at 1 thread, 9.3 us at 2), more than
// most of a decoding step's ~40 kernels take at its few rows; split at every size, a batch-1 step spent more in
// forks and joins than 2 threads saved.
constexpr int64_t kMinParallelWork = 1 << 18;

// at::parallel_for's grain for items of about `work` multiply-adds each: loops of less than kMinParallelWork in all
// run on the calling thread.
inline int64_t parallel_grain(int64_t work) {
  return std::max<int64_t>(1, kMinParallelWork / std::max<int64_t>(1, work));
}

// In its scope, the ATen kernels the calling thread runs stay on it where `serial` (ATen splits e.g. a layer norm
// of more than one row between threads, whatever its size): OpenMP's thread count of this thread is set to 1 and
// restored (at::parallel_for splits only where it is above 1; at::in_parallel_region is OpenMP's own flag).
class SerialScope {
 public:
  explicit SerialScope(bool serial) : before_(serial ? omp_get_max_threads() : 1) {
    if (before_ > 1) omp_set_num_threads(1);
  }
  ~SerialScope() {
    if (before_ > 1) omp_set_num_threads(before_);
  }
  SerialScope(const SerialScope&) = delete;
  SerialScope& operator=(const SerialScope&) = delete;

 private:
  int before_;
};

// The output buffers of a decoder step, reused from step to step. A step asks for its GEMM, attention and embedding
// outputs and its logits in the same order and shapes every step (until sentences leave the batch), so from the
// second step on they are not allocated again: ~30 allocations per step at a step's few rows (posix_memalign,
// glibc's slow path), and the free of the 160 KB logits made glibc consolidate its bins every step (~2 % of a
// batch-1 int8 decode of the mini NMT transformer, 2026-12-01; ATen's layer norms still allocate theirs). A buffer
// is valid until the next rewind(): whoever holds one across steps must copy it.
class StepBuffers {
 public:
  // The next buffer, float32 of `sizes` (reallocated where the last step's was of another shape).
  torch::Tensor take(at::IntArrayRef sizes);
  void rewind() { next_ = 0; }

 private:
  std::vector<torch::Tensor> buffers_;
  size_t next_ = 0;
};

// A kernel's output: `given` (a contiguous float32 CPU tensor of `sizes`, e.g. a step buffer; anything else is a
// one-line error naming the kernel) or a new tensor.
inline torch::Tensor output_of(const std::optional<torch::Tensor>& given, at::IntArrayRef sizes, const char* kernel) {
  if (!given) return torch::empty(sizes, torch::kFloat32);
  TORCH_CHECK(given->device().is_cpu() && given->scalar_type() == torch::kFloat32 && given->is_contiguous() &&
                  given->sizes() == sizes,
              kernel, ": out must be a contiguous float32 CPU tensor of ", sizes, ", got ", given->sizes());
  return *given;
}

// A float32 tensor of `sizes` to write into: the next of `buffers`, or a fresh one where there are none.
inline torch::Tensor fresh(StepBuffers* buffers, at::IntArrayRef sizes) {
  return buffers != nullptr ? buffers->take(sizes) : torch::empty(sizes, torch::kFloat32);
}

torch::Tensor cache_attention_step(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                   const torch::Tensor& keys, const torch::Tensor& values, const torch::Tensor& table,
                                   int64_t step, const std::optional<torch::Tensor>& out = std::nullopt);

torch::Tensor int8_cache_attention_step(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                        const torch::Tensor& keys, const torch::Tensor& values,
                                        const torch::Tensor& key_scale, const torch::Tensor& value_scale,
                                        const torch::Tensor& table, int64_t step,
                                        const std::optional<torch::Tensor>& out = std::nullopt);

torch::Tensor level_cache_attention_step(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                         const torch::Tensor& keys, const torch::Tensor& values,
                                         const torch::Tensor& level_factors, const torch::Tensor& level_steps,
                                         const torch::Tensor& table, int64_t step,
                                         const std::optional<torch::Tensor>& out = std::nullopt);

torch::Tensor memory_attention(const torch::Tensor& q, const torch::Tensor& keys, const torch::Tensor& values,
                               const torch::Tensor& padding, int64_t beam,
                               const std::optional<torch::Tensor>& out = std::nullopt);

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> log_softmax_topk(
    const torch::Tensor& logits, const torch::Tensor& row_bias, int64_t k, int64_t pad, int64_t unk, int64_t eos,
    double unk_penalty, int64_t eos_mode);

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, bool> merge_candidates(
    const torch::Tensor& values, const torch::Tensor& ids, const torch::Tensor& cands_to_ignore, int64_t eos);

torch::Tensor advance_beams(const torch::Tensor& cand_scores, const torch::Tensor& cand_tokens,
                            const torch::Tensor& cand_beams, const torch::Tensor& eos_mask,
                            torch::Tensor& cands_to_ignore, torch::Tensor& tokens, torch::Tensor& scores,
                            int64_t step);

void advance_table(torch::Tensor& table, const torch::Tensor& parents, int64_t steps);

torch::Tensor window_convolution_step(const torch::Tensor& x, const torch::Tensor& inputs, const torch::Tensor& table,
                                      int64_t step, const torch::Tensor& weight);

// An int8 linear layer (int8_gemm_cpu.cpp): int8 levels [out, in] packed once, 7-bit activations with a static
// scale and zero point, y = (levels . (q - z)) * scales + bias with scales = row scales * input scale.
struct Int8Weights {
  Int8Weights(const torch::Tensor& levels, const torch::Tensor& scales, std::optional<torch::Tensor> bias,
              double input_scale, int64_t zero_point);
  torch::Tensor operator()(const torch::Tensor& input) const { return run(input, "", false); }
  // on the kernels of `isa` (avx512-vnni, avx2, baseline; "": the best this CPU has), relu: max(0, y) fused; into
  // `out` [rows, out_features] where given
  torch::Tensor run(const torch::Tensor& input, const std::string& isa, bool relu,
                    const std::optional<torch::Tensor>& out = std::nullopt) const;
  int64_t out_features, in_features;
  torch::Tensor scales;
  std::optional<torch::Tensor> bias;
  float inverse_scale;  // float32 1 / input scale: activations are quantized by this product
  int64_t zero_point;
  torch::Tensor packed;   // [out / 16, in / 4, 64] int8 (both rounded up, zero-padded)
  torch::Tensor offsets;  // [out rounded up to 16] int32: zero point x each row's sum of levels
  torch::Tensor padded_scales, padded_bias;  // [out rounded up to 16] float32, zeros beyond out
};

// A whole decoder step (decoder_step_cpu.cpp's DecoderStep), as the beam search loop (beam_search_loop_cpu.cpp)
// calls it: float32 logits [rows, V] of tokens [B * beam] (or of output_rows only), the caches' tensors in the
// order its layers take them, the beam indirection table [B, beam, T], the step, the positional embeddings by
// step or none; its intermediate results and logits in `buffers` where given (valid until their next rewind).
struct NativeDecoderStep {
  virtual ~NativeDecoderStep() = default;
  virtual torch::Tensor forward(const torch::Tensor& tokens, const std::vector<torch::Tensor>& caches,
                                const torch::Tensor& table, int64_t step, const std::optional<torch::Tensor>& positions,
                                const std::optional<torch::Tensor>& output_rows, StepBuffers* buffers) const = 0;
};

void register_decoder_step(pybind11::module_& m);
void register_beam_search_loop(pybind11::module_& m);
void register_encoder(pybind11::module_& m);
void register_int8_gemm(pybind11::module_& m);
