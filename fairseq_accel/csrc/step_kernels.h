// The step kernels of beam_search_cpu.cpp that the native decoder step (decoder_step_cpu.cpp) calls, and the
// registration of that step's classes into the extension module.
#pragma once

#include <torch/extension.h>

torch::Tensor cache_attention_step(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                   torch::Tensor& keys, torch::Tensor& values, const torch::Tensor& table,
                                   int64_t step);

torch::Tensor memory_attention(const torch::Tensor& q, const torch::Tensor& keys, const torch::Tensor& values,
                               const torch::Tensor& padding, int64_t beam);

torch::Tensor window_convolution_step(const torch::Tensor& x, torch::Tensor& inputs, const torch::Tensor& table,
                                      int64_t step, const torch::Tensor& weight);

void register_decoder_step(pybind11::module_& m);
