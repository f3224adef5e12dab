// The step kernels of beam_search_cpu.cpp and the int8 linear layer of int8_gemm_cpu.cpp that the native decoder
// step (decoder_step_cpu.cpp) calls, and the registration of those classes into the extension module.
#pragma once

#include <torch/extension.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

// Every binding of the extension releases the GIL while it runs: the fast generator decodes several shards of a
// batch in threads at once (a Python layer called back from the C++ step takes the GIL again).
inline constexpr auto kNoGil = pybind11::call_guard<pybind11::gil_scoped_release>();

torch::Tensor cache_attention_step(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                   torch::Tensor& keys, torch::Tensor& values, const torch::Tensor& table,
                                   int64_t step);

torch::Tensor int8_cache_attention_step(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                        torch::Tensor& keys, torch::Tensor& values, torch::Tensor& key_scale,
                                        torch::Tensor& value_scale, const torch::Tensor& table, int64_t step);

torch::Tensor level_cache_attention_step(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                         torch::Tensor& keys, torch::Tensor& values, const torch::Tensor& level_factors,
                                         const torch::Tensor& level_steps, const torch::Tensor& table, int64_t step);

torch::Tensor memory_attention(const torch::Tensor& q, const torch::Tensor& keys, const torch::Tensor& values,
                               const torch::Tensor& padding, int64_t beam);

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

torch::Tensor window_convolution_step(const torch::Tensor& x, torch::Tensor& inputs, const torch::Tensor& table,
                                      int64_t step, const torch::Tensor& weight);

// An int8 linear layer (int8_gemm_cpu.cpp): int8 levels [out, in] packed once, 7-bit activations with a static
// scale and zero point, y = (levels . (q - z)) * scales + bias with scales = row scales * input scale.
struct Int8Weights {
  Int8Weights(const torch::Tensor& levels, const torch::Tensor& scales, std::optional<torch::Tensor> bias,
              double input_scale, int64_t zero_point);
  torch::Tensor operator()(const torch::Tensor& input) const { return run(input, "", false); }
  // on the kernels of `isa` (avx512-vnni, avx2, baseline; "": the best this CPU has), relu: max(0, y) fused
  torch::Tensor run(const torch::Tensor& input, const std::string& isa, bool relu) const;
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
// step or none.
struct NativeDecoderStep {
  virtual ~NativeDecoderStep() = default;
  virtual torch::Tensor forward(const torch::Tensor& tokens, std::vector<torch::Tensor> caches,
                                const torch::Tensor& table, int64_t step, const std::optional<torch::Tensor>& positions,
                                const std::optional<torch::Tensor>& output_rows) const = 0;
};

void register_decoder_step(pybind11::module_& m);
void register_beam_search_loop(pybind11::module_& m);
void register_encoder(pybind11::module_& m);
void register_int8_gemm(pybind11::module_& m);
