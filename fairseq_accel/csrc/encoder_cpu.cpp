// fairseq's transformer encoder (TransformerEncoderBase with TransformerEncoderLayerBase layers) in one call, for
// models whose encoder layers are all int8 (a compressed checkpoint's Int8Linear: native_encoder.py decides).
//
// At batch 1 the int8 model's encoder took ~15 % of a decode of the mini NMT transformer, nearly all of it Python:
// fairseq's attention module path (the one int8 layers take, int8_execution.call_projection_modules) runs ~40
// Python statements per layer around a dozen tensor ops. Here the same ATen ops run in the same order on tensors
// of the same shapes and strides (the projections' int8 GEMM is the one their module calls), so the output is
// the Python encoder's, bit for bit. Rows stay time-major, [S * B, C], as fairseq's [S, B, C] after its
// transpose (every op but attention treats rows independently).
#include "native_layers.h"
#include "step_kernels.h"

#include <limits>
#include <memory>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

namespace {

using torch::Tensor;

// fairseq's MultiheadAttention as self-attention on its module path: q, k, v projections, q scaled, scores by
// bmm over (batch x head), padded keys -inf, softmax, bmm with the values, the output projection.
struct EncoderSelfAttention {
  EncoderSelfAttention(Linear q, Linear k, Linear v, Linear out, int64_t heads, int64_t head_dim, double scaling)
      : q(std::move(q)), k(std::move(k)), v(std::move(v)), out(std::move(out)), heads(heads), head_dim(head_dim),
        scaling(scaling) {}

  // x [S * B, C] time-major; padding [B, S] (true: padded) or none.
  Tensor forward(const Tensor& x, int64_t length, int64_t batch, const std::optional<Tensor>& padding) const {
    const auto by_heads = [&](const Tensor& t) { return t.view({length, batch * heads, head_dim}).transpose(0, 1); };
    auto query = q(x);
    query.mul_(scaling);
    auto scores = at::bmm(by_heads(query), by_heads(k(x)).transpose(1, 2));  // [B * H, S, S]
    if (padding) {
      scores.view({batch, heads, length, length})
          .masked_fill_(padding->view({batch, 1, 1, length}), -std::numeric_limits<double>::infinity());
    }
    const auto attended = at::bmm(at::softmax(scores, -1, torch::kFloat32), by_heads(v(x)));  // [B * H, S, D]
    return out(attended.transpose(0, 1).contiguous().view({length * batch, heads * head_dim}));
  }

  Linear q, k, v, out;
  int64_t heads, head_dim;
  double scaling;
};

// TransformerEncoderLayerBase: self-attention and feed-forward blocks, pre- or post-norm.
struct EncoderLayer {
  EncoderLayer(bool pre_norm, Norm self_norm, EncoderSelfAttention attention, Norm final_norm, FeedForward feed_forward)
      : pre_norm(pre_norm), self_norm(std::move(self_norm)), attention(std::move(attention)),
        final_norm(std::move(final_norm)), feed_forward(std::move(feed_forward)) {}

  Tensor forward(const Tensor& x, int64_t length, int64_t batch, const std::optional<Tensor>& padding) const {
    const auto h = residual_block(pre_norm, x, self_norm,
                                  [&](const Tensor& y) { return attention.forward(y, length, batch, padding); });
    return residual_block(pre_norm, h, final_norm, [&](const Tensor& y) { return feed_forward(y); });
  }

  bool pre_norm;
  Norm self_norm;
  EncoderSelfAttention attention;
  Norm final_norm;
  FeedForward feed_forward;
};

// TransformerEncoderBase.forward_scriptable without its training-only parts (dropout, layer drop, quant noise).
struct TransformerEncoder {
  TransformerEncoder(Tensor embedding, double embed_scale, int64_t padding_idx, std::optional<Norm> embedding_norm,
                     std::vector<EncoderLayer> layers, std::optional<Norm> final_norm)
      : embedding(std::move(embedding)), embed_scale(embed_scale), padding_idx(padding_idx),
        embedding_norm(std::move(embedding_norm)), layers(std::move(layers)), final_norm(std::move(final_norm)) {}

  // src_tokens [B, S]; positions [B, S, C] (the encoder's positional embeddings of them) or none. Returns
  // (encoder output [S, B, C], padding mask [B, S], scaled token embeddings [B, S, C]), fairseq's encoder_out.
  std::tuple<Tensor, Tensor, Tensor> forward(const Tensor& src_tokens, const std::optional<Tensor>& positions) const {
    TORCH_CHECK(src_tokens.dim() == 2 && src_tokens.scalar_type() == torch::kInt64,
                "the native encoder takes int64 src_tokens [batch, length]");
    const at::AutoDispatchBelowADInplaceOrView below_autograd;  // as the beam search loop: no autograd in decoding
    const int64_t batch = src_tokens.size(0), length = src_tokens.size(1);
    const auto padding = src_tokens.eq(padding_idx);
    const auto has_pads = padding.any();
    const auto embed = at::embedding(embedding, src_tokens) * embed_scale;
    auto x = positions ? embed + *positions : embed;
    if (embedding_norm) x = (*embedding_norm)(x);
    x = x * (1 - padding.unsqueeze(-1).to(x.scalar_type()) * has_pads.to(x.scalar_type()));
    x = x.transpose(0, 1).contiguous().view({length * batch, -1});
    const std::optional<Tensor> key_padding = has_pads.item<bool>() ? std::optional<Tensor>(padding) : std::nullopt;
    for (const auto& layer : layers) x = layer.forward(x, length, batch, key_padding);
    if (final_norm) x = (*final_norm)(x);
    return {x.view({length, batch, -1}), padding, embed};
  }

  Tensor embedding;
  double embed_scale;
  int64_t padding_idx;
  std::optional<Norm> embedding_norm;
  std::vector<EncoderLayer> layers;
  std::optional<Norm> final_norm;
};

}  // namespace

void register_encoder(pybind11::module_& m) {
  namespace py = pybind11;
  py::class_<EncoderSelfAttention>(m, "EncoderSelfAttention", "fairseq's encoder self-attention (module path)")
      .def(py::init<Linear, Linear, Linear, Linear, int64_t, int64_t, double>(), py::arg("q"), py::arg("k"),
           py::arg("v"), py::arg("out"), py::arg("heads"), py::arg("head_dim"), py::arg("scaling"));
  py::class_<EncoderLayer>(m, "EncoderLayer", "fairseq's TransformerEncoderLayerBase")
      .def(py::init<bool, Norm, EncoderSelfAttention, Norm, FeedForward>());
  py::class_<TransformerEncoder>(m, "TransformerEncoder", "fairseq's transformer encoder in one call (CPU)")
      .def(py::init<Tensor, double, int64_t, std::optional<Norm>, std::vector<EncoderLayer>, std::optional<Norm>>())
      .def("__call__", &TransformerEncoder::forward, kNoGil, py::arg("src_tokens"), py::arg("positions"));
}
