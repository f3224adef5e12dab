// The layers the native decoder step (decoder_step_cpu.cpp) and the native encoder (encoder_cpu.cpp) are built
// from: a linear layer (float32 weights, int8 weights or a Python layer called back), a layer norm, the
// feed-forward block and the residual block around a sublayer; the same ATen kernels as the Python modules they
// stand for, so that their outputs are those modules', bit for bit. The linear layers take the StepBuffers to
// write their outputs into, or none (fresh tensors).
#pragma once

#include "step_kernels.h"

#include <ATen/ops/native_layer_norm_native.h>

#include <memory>
#include <optional>
#include <utility>

// x @ W^T + b with W^T stored contiguous once (int8_execution.TransposedLinear), an int8 layer's packed weights
// (int8_gemm_cpu.cpp), or a Python layer called back.
struct Linear {
  Linear(torch::Tensor weight_t, std::optional<torch::Tensor> bias)
      : weight_t(std::move(weight_t)), bias(std::move(bias)) {}
  explicit Linear(std::shared_ptr<Int8Weights> int8) : int8(std::move(int8)) {}
  explicit Linear(pybind11::object layer) : layer(std::move(layer)) {}
  torch::Tensor operator()(const torch::Tensor& x, StepBuffers* buffers = nullptr) const {
    if (int8) return int8->run(x, "", false, output(x, buffers));
    if (layer) {  // the step runs without the GIL (kNoGil)
      pybind11::gil_scoped_acquire gil;
      return (*layer)(x).cast<torch::Tensor>().clone();  // a tensor of its own: the step adds into outputs
    }
    auto out = output(x, buffers);  // addmm's and mm's own kernels, into out
    return bias ? at::addmm_out(out, *bias, x, weight_t) : at::mm_out(out, x, weight_t);
  }
  // the tensor the output of x [rows, in] goes to (a step buffer, or a fresh one)
  torch::Tensor output(const torch::Tensor& x, StepBuffers* buffers) const {
    return fresh(buffers, {x.size(0), int8 ? int8->out_features : weight_t.size(1)});
  }
  torch::Tensor weight_t;
  std::optional<torch::Tensor> bias;
  std::shared_ptr<Int8Weights> int8;
  std::optional<pybind11::object> layer;
};

// torch.nn.LayerNorm over the last dimension.
struct Norm {
  Norm(std::optional<torch::Tensor> weight, std::optional<torch::Tensor> bias, double eps, int64_t dim)
      : weight(std::move(weight)), bias(std::move(bias)), eps(eps), dim(dim) {}
  // On the CPU, ATen's CPU layer norm (what at::layer_norm dispatches to) called directly: the same kernel and
  // values, without the dispatcher's hops through the composite and autograd layers.
  // Small inputs (a step's few rows) on this thread: ATen splits every layer norm of more than one row.
  torch::Tensor operator()(const torch::Tensor& x) const {
    if (!x.device().is_cpu()) return at::layer_norm(x, {dim}, weight, bias, eps);
    const SerialScope small(x.numel() * 4 < kMinParallelWork);
    return std::get<0>(at::native::layer_norm_cpu(x, {dim}, weight, bias, eps));
  }
  std::optional<torch::Tensor> weight, bias;
  double eps;
  int64_t dim;
};

enum Activation : int64_t { kRelu = 0, kGelu = 1 };

// In place on the layer's fresh output (the same values as at::relu / at::gelu, one allocation less).
inline torch::Tensor activate(torch::Tensor x, int64_t activation) {
  TORCH_CHECK(activation == kRelu || activation == kGelu, "unknown activation ", activation);
  return activation == kRelu ? at::relu_(x) : at::gelu_(x);
}

// fc2(norm(activation(fc1 x))), the norm only in SAN-M's decoder FFN.
struct FeedForward {
  FeedForward(Linear fc1, int64_t activation, std::optional<Norm> inner_norm, Linear fc2)
      : fc1(std::move(fc1)), activation(activation), inner_norm(std::move(inner_norm)), fc2(std::move(fc2)) {}
  torch::Tensor operator()(const torch::Tensor& x, StepBuffers* buffers = nullptr) const {
    // an int8 fc1 applies the relu in its GEMM's epilogue (the same values: max(0, y))
    auto hidden = fc1.int8 && activation == kRelu ? fc1.int8->run(x, "", true, fc1.output(x, buffers))
                                                  : activate(fc1(x, buffers), activation);
    return fc2(inner_norm ? (*inner_norm)(hidden) : hidden, buffers);
  }
  Linear fc1;
  int64_t activation;
  std::optional<Norm> inner_norm;
  Linear fc2;
};

// x + body(norm(x)) (pre-norm) or norm(x + body(x)) (post-norm); the sum in place on the body's fresh output
// (float addition commutes: the same values as x + body)
template <typename Body>
torch::Tensor residual_block(bool pre_norm, const torch::Tensor& x, const Norm& norm, Body body) {
  return pre_norm ? body(norm(x)).add_(x) : norm(body(x).add_(x));
}
