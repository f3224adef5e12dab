// The fast generator's whole float32 decoder step on CPU in one call (the Python step objects' native() methods
// in transformer_step.py / sanm_step.py build it): embedding, every layer, the final norm, the output projection.
//
// The Python step (transformer_step.py, sanm_step.py) issues ~20 torch calls per layer, each ~5-10 us of Python
// and dispatch, which at a decoding step's few rows cost as much as the arithmetic. Here the same ATen ops
// (addmm on the weights transposed once, layer_norm, relu/gelu, glu, add) and the step kernels of
// beam_search_cpu.cpp run in the same order from C++, so the logits are the Python step's, bit for bit (int8
// layers run the same int8 GEMM as their Python module, int8_gemm_cpu.cpp).
//
// State stays in Python (beam_cache.py: the caches are reallocated when sentences leave the batch): every call
// takes the caches' tensors as one list in the order the layers consume them (per layer: each self-attention
// branch's keys and values (an int8 cache: and their scales) or a convolution's window buffer, then the
// cross-attention's keys, values, padding).
#include "native_layers.h"
#include "step_kernels.h"

#include <memory>
#include <optional>
#include <utility>
#include <vector>

namespace {

using torch::Tensor;

// One step's inputs: the caches' tensors, taken in order, the beam indirection table and the step; the buffers
// its outputs go to (or none: fresh tensors).
struct StepState {
  const Tensor& take() {
    TORCH_CHECK(next < caches.size(), "the decoder step needs more cache tensors than the ", caches.size(), " given");
    return caches[next++];
  }
  const std::vector<Tensor>& caches;
  const Tensor& table;
  int64_t step;
  int64_t beam;
  StepBuffers* buffers;
  size_t next = 0;
};

// A self-attention branch: fairseq's MultiheadAttention over the float32 cache, or an LSRA convolution.
struct Branch {
  virtual ~Branch() = default;
  virtual Tensor forward(const Tensor& x, StepState& state) const = 0;
};

// Q/K/V in one GEMM (query scaling folded in), then cache_attention_step; takes the keys and values caches (and
// with an int8 cache their scales: int8_cache_attention_step). With level factors and steps (the int8 attention
// path): the int8 caches hold the projection's calibrated output levels, level_cache_attention_step.
struct AttentionBranch : Branch {
  AttentionBranch(Linear qkv, Linear out, int64_t heads, int64_t head_dim, bool int8_cache,
                  std::optional<Tensor> level_factors, std::optional<Tensor> level_steps)
      : qkv(std::move(qkv)), out(std::move(out)), heads(heads), head_dim(head_dim), int8_cache(int8_cache),
        level_factors(std::move(level_factors)), level_steps(std::move(level_steps)) {
    TORCH_CHECK(this->level_factors.has_value() == this->level_steps.has_value() &&
                    (!this->level_steps || int8_cache),
                "the int8 attention path needs an int8 cache and both its level factors and steps");
  }
  Tensor forward(const Tensor& x, StepState& state) const override {
    const int64_t rows = x.size(0);
    const auto projected = qkv(x, state.buffers).view({rows, 3, heads, head_dim});
    const auto q = projected.select(1, 0), k = projected.select(1, 1), v = projected.select(1, 2);
    const Tensor& keys = state.take();
    const Tensor& values = state.take();
    const auto output = fresh(state.buffers, {rows, heads, head_dim});
    Tensor attended;
    if (level_steps) {
      attended = level_cache_attention_step(q, k, v, keys, values, *level_factors, *level_steps, state.table,
                                            state.step, output);
    } else if (int8_cache) {
      const Tensor& key_scale = state.take();
      const Tensor& value_scale = state.take();
      attended = int8_cache_attention_step(q, k, v, keys, values, key_scale, value_scale, state.table, state.step,
                                           output);
    } else {
      attended = cache_attention_step(q, k, v, keys, values, state.table, state.step, output);
    }
    return out(attended.view({rows, heads * head_dim}), state.buffers);
  }
  Linear qkv, out;
  int64_t heads, head_dim;
  bool int8_cache;
  std::optional<Tensor> level_factors, level_steps;  // [3, H, D] each
};

// An LSRA convolution branch: linear, GLU optionally, the causal window, linear; takes the window. Lightweight:
// fixed taps [W, C]; dynamic: each hypothesis' taps [H, W] from a linear layer of the GLU's output, softmax-ed
// optionally.
struct ConvolutionBranch : Branch {
  ConvolutionBranch(Linear linear_in, bool glu, std::optional<Tensor> taps, std::optional<Linear> weight_linear,
                    int64_t heads, int64_t width, bool weight_softmax, Linear linear_out)
      : linear_in(std::move(linear_in)), glu(glu), taps(std::move(taps)), weight_linear(std::move(weight_linear)),
        heads(heads), width(width), weight_softmax(weight_softmax), linear_out(std::move(linear_out)) {
    TORCH_CHECK(this->taps.has_value() != this->weight_linear.has_value(),
                "a convolution branch has fixed taps or a weight layer, not both");
  }
  Tensor forward(const Tensor& x, StepState& state) const override {
    auto hidden = linear_in(x, state.buffers);
    if (glu) hidden = at::glu(hidden, -1);
    Tensor weight = taps ? *taps : (*weight_linear)(hidden, state.buffers).view({x.size(0), heads, width});
    if (weight_linear && weight_softmax) weight = at::softmax(weight, -1);
    return linear_out(window_convolution_step(hidden, state.take(), state.table, state.step, weight), state.buffers);
  }
  Linear linear_in;
  bool glu;
  std::optional<Tensor> taps;  // [W, C]
  std::optional<Linear> weight_linear;
  int64_t heads, width;
  bool weight_softmax;
  Linear linear_out;
};

// Attention over the encoder memory; takes its keys, values and padding (an empty tensor: none).
struct CrossAttention {
  CrossAttention(Linear q, Linear out, int64_t heads, int64_t head_dim)
      : q(std::move(q)), out(std::move(out)), heads(heads), head_dim(head_dim) {}
  Tensor forward(const Tensor& x, StepState& state) const {
    const int64_t rows = x.size(0);
    const auto query = q(x, state.buffers).view({rows, heads, head_dim});
    const Tensor& keys = state.take();
    const Tensor& values = state.take();
    const Tensor& padding = state.take();
    const auto attended =
        memory_attention(query, keys, values, padding, state.beam, fresh(state.buffers, {rows, heads, head_dim}));
    return out(attended.view({rows, heads * head_dim}), state.buffers);
  }
  Linear q, out;
  int64_t heads, head_dim;
};

// Every cross-attention's keys and values of the encoder output [S, B, C], once per batch: each projection as
// [B, H, S, D], contiguous (CrossAttentionStep.start's projection, view, permute and contiguous, the same ops), in
// one call instead of two module calls and three tensor ops per layer from Python (~0.1 ms of a short sentence's
// ~3.7 ms at batch 1).
struct MemoryProjections {
  MemoryProjections(std::vector<Linear> projections, int64_t heads, int64_t head_dim)
      : projections(std::move(projections)), heads(heads), head_dim(head_dim) {}
  std::vector<Tensor> forward(const Tensor& encoder_out) const {
    TORCH_CHECK(encoder_out.dim() == 3, "the encoder output must be [S, B, C]");
    const at::AutoDispatchBelowADInplaceOrView below_autograd;  // as the beam search loop: no autograd in decoding
    const int64_t length = encoder_out.size(0), batch = encoder_out.size(1);
    const auto rows = encoder_out.reshape({length * batch, encoder_out.size(2)});
    std::vector<Tensor> projected;
    for (const auto& projection : projections)
      projected.push_back(
          projection(rows).view({length, batch, heads, head_dim}).permute({1, 2, 0, 3}).contiguous());
    return projected;
  }
  std::vector<Linear> projections;
  int64_t heads, head_dim;
};

struct Layer {
  virtual ~Layer() = default;
  virtual Tensor forward(const Tensor& x, StepState& state) const = 0;
};

// fairseq's TransformerDecoderLayerBase (pre- or post-norm); its self-attention is one branch over all channels
// or LSRA's branches over consecutive channel slices, outputs concatenated.
struct TransformerLayer : Layer {
  TransformerLayer(bool pre_norm, Norm self_norm, std::vector<std::shared_ptr<Branch>> branches,
                   std::vector<int64_t> widths, std::shared_ptr<CrossAttention> cross, std::optional<Norm> cross_norm,
                   Norm final_norm, FeedForward feed_forward)
      : pre_norm(pre_norm), self_norm(std::move(self_norm)), branches(std::move(branches)), widths(std::move(widths)),
        cross(std::move(cross)), cross_norm(std::move(cross_norm)), final_norm(std::move(final_norm)),
        feed_forward(std::move(feed_forward)) {
    TORCH_CHECK(!this->branches.empty() && this->branches.size() == this->widths.size(),
                "a layer needs one width per self-attention branch");
    TORCH_CHECK(!this->cross || this->cross_norm, "a cross-attention needs its norm");
  }

  Tensor self_attention(const Tensor& x, StepState& state) const {
    if (branches.size() == 1) return branches[0]->forward(x, state);
    const auto chunks = at::split_with_sizes(x, widths, -1);
    std::vector<Tensor> outputs;
    for (size_t i = 0; i < branches.size(); ++i) outputs.push_back(branches[i]->forward(chunks[i], state));
    return at::cat(outputs, -1);
  }

  Tensor forward(const Tensor& x, StepState& state) const override {
    auto h = residual_block(pre_norm, x, self_norm, [&](const Tensor& y) { return self_attention(y, state); });
    if (cross) h = residual_block(pre_norm, h, *cross_norm, [&](const Tensor& y) { return cross->forward(y, state); });
    return residual_block(pre_norm, h, final_norm, [&](const Tensor& y) { return feed_forward(y, state.buffers); });
  }

  bool pre_norm;
  Norm self_norm;
  std::vector<std::shared_ptr<Branch>> branches;
  std::vector<int64_t> widths;
  std::shared_ptr<CrossAttention> cross;
  std::optional<Norm> cross_norm;
  Norm final_norm;
  FeedForward feed_forward;
};

// SAN-M's FSMN decoder layer: h = FFN(norm1 x); x + FSMN(norm2 h) (FSMN(y) = causal window(y) + y), then
// + cross-attention(norm3 x); without FSMN (the last, FFN-only layer) it returns h. Takes the FSMN's window.
struct SANMLayer : Layer {
  SANMLayer(Norm norm1, FeedForward feed_forward, std::optional<Norm> norm2, std::optional<Tensor> fsmn_taps,
            std::shared_ptr<CrossAttention> cross, std::optional<Norm> norm3)
      : norm1(std::move(norm1)), feed_forward(std::move(feed_forward)), norm2(std::move(norm2)),
        fsmn_taps(std::move(fsmn_taps)), cross(std::move(cross)), norm3(std::move(norm3)) {
    TORCH_CHECK(this->fsmn_taps.has_value() == (this->norm2 && this->cross && this->norm3),
                "a SAN-M layer has its FSMN, cross-attention and their norms, or none of them");
  }

  Tensor forward(const Tensor& x, StepState& state) const override {
    const auto hidden = feed_forward(norm1(x), state.buffers);
    if (!fsmn_taps) return hidden;
    const auto y = (*norm2)(hidden);
    const auto h = x + (window_convolution_step(y, state.take(), state.table, state.step, *fsmn_taps) + y);
    return h + cross->forward((*norm3)(h), state);
  }

  Norm norm1;
  FeedForward feed_forward;
  std::optional<Norm> norm2;
  std::optional<Tensor> fsmn_taps;  // [W, C]
  std::shared_ptr<CrossAttention> cross;
  std::optional<Norm> norm3;
};

// Token embedding (scaled, plus the step's position, normed optionally), the layers, the final norm of the rows
// that are projected, and the output projection to float32 logits.
struct DecoderStep : NativeDecoderStep {
  DecoderStep(Tensor embedding, double embed_scale, std::optional<Norm> embedding_norm,
              std::vector<std::shared_ptr<Layer>> layers, std::optional<Norm> final_norm, Linear output)
      : embedding(std::move(embedding)), embed_scale(embed_scale), embedding_norm(std::move(embedding_norm)),
        layers(std::move(layers)), final_norm(std::move(final_norm)), output(std::move(output)) {}

  // tokens [B * beam]; caches as the header says; table [B, beam, T] int64; positions [T, C] (the decoder's
  // positional embeddings by step) or None; output_rows: the rows to project, or None for all.
  Tensor forward(const Tensor& tokens, const std::vector<Tensor>& caches, const Tensor& table, int64_t step,
                 const std::optional<Tensor>& positions, const std::optional<Tensor>& output_rows,
                 StepBuffers* buffers) const override {
    TORCH_CHECK(table.dim() == 3, "table must be [B, beam, T]");
    TORCH_CHECK(tokens.dim() == 1, "tokens must be [B * beam]");
    StepState state{caches, table, step, table.size(1), buffers};
    // embedding(tokens) * scale (+ position): in place on one buffer, the same float operations
    auto x = fresh(buffers, {tokens.size(0), embedding.size(1)});
    at::index_select_out(x, embedding, 0, tokens);
    x.mul_(embed_scale);
    if (positions) x.add_(positions->select(0, step));
    if (embedding_norm) x = (*embedding_norm)(x);
    for (const auto& layer : layers) x = layer->forward(x, state);
    TORCH_CHECK(state.next == caches.size(), "the decoder step used ", state.next, " of ", caches.size(),
                " cache tensors");
    if (output_rows) x = x.index_select(0, *output_rows);  // rows are independent from here on
    if (final_norm) x = (*final_norm)(x);
    return output(x, buffers);
  }

  Tensor embedding;
  double embed_scale;
  std::optional<Norm> embedding_norm;
  std::vector<std::shared_ptr<Layer>> layers;
  std::optional<Norm> final_norm;
  Linear output;
};

}  // namespace

void register_decoder_step(pybind11::module_& m) {
  namespace py = pybind11;
  py::class_<Linear>(m, "Linear", "x @ W^T + b on W^T stored once, int8 weights, or a Python layer called back")
      .def(py::init<Tensor, std::optional<Tensor>>())
      .def(py::init<std::shared_ptr<Int8Weights>>())
      .def_static("calling", [](py::object layer) { return Linear(std::move(layer)); });
  py::class_<Norm>(m, "Norm", "layer norm over the last dimension")
      .def(py::init<std::optional<Tensor>, std::optional<Tensor>, double, int64_t>());
  py::class_<FeedForward>(m, "FeedForward", "fc2(norm(activation(fc1 x))); activation 0 relu, 1 gelu")
      .def(py::init<Linear, int64_t, std::optional<Norm>, Linear>());
  py::class_<Branch, std::shared_ptr<Branch>>(m, "Branch");
  py::class_<AttentionBranch, Branch, std::shared_ptr<AttentionBranch>>(m, "AttentionBranch")
      .def(py::init<Linear, Linear, int64_t, int64_t, bool, std::optional<Tensor>, std::optional<Tensor>>(),
           py::arg("qkv"), py::arg("out"), py::arg("heads"),
           py::arg("head_dim"), py::arg("int8_cache") = false, py::arg("level_factors") = std::nullopt,
           py::arg("level_steps") = std::nullopt);
  py::class_<ConvolutionBranch, Branch, std::shared_ptr<ConvolutionBranch>>(m, "ConvolutionBranch")
      .def(py::init<Linear, bool, std::optional<Tensor>, std::optional<Linear>, int64_t, int64_t, bool, Linear>());
  py::class_<CrossAttention, std::shared_ptr<CrossAttention>>(m, "CrossAttention")
      .def(py::init<Linear, Linear, int64_t, int64_t>());
  py::class_<MemoryProjections>(m, "MemoryProjections",
                                "cross-attention keys and values [B, H, S, D] of an encoder output [S, B, C]")
      .def(py::init<std::vector<Linear>, int64_t, int64_t>(), py::arg("projections"), py::arg("heads"),
           py::arg("head_dim"))
      .def("__call__", &MemoryProjections::forward, kNoGil, py::arg("encoder_out"));
  py::class_<Layer, std::shared_ptr<Layer>>(m, "Layer");
  py::class_<TransformerLayer, Layer, std::shared_ptr<TransformerLayer>>(m, "TransformerLayer")
      .def(py::init<bool, Norm, std::vector<std::shared_ptr<Branch>>, std::vector<int64_t>,
                    std::shared_ptr<CrossAttention>, std::optional<Norm>, Norm, FeedForward>());
  py::class_<SANMLayer, Layer, std::shared_ptr<SANMLayer>>(m, "SANMLayer")
      .def(py::init<Norm, FeedForward, std::optional<Norm>, std::optional<Tensor>, std::shared_ptr<CrossAttention>,
                    std::optional<Norm>>());
  py::class_<NativeDecoderStep, std::shared_ptr<NativeDecoderStep>>(m, "NativeDecoderStep");
  py::class_<DecoderStep, NativeDecoderStep, std::shared_ptr<DecoderStep>>(
      m, "DecoderStep", "a float32 decoder's whole step: logits of every hypothesis' next token")
      .def(py::init<Tensor, double, std::optional<Norm>, std::vector<std::shared_ptr<Layer>>, std::optional<Norm>,
                    Linear>())
      .def(
          "__call__",
          [](const DecoderStep& step, const Tensor& tokens, const std::vector<Tensor>& caches, const Tensor& table,
             int64_t index, const std::optional<Tensor>& positions, const std::optional<Tensor>& output_rows) {
            return step.forward(tokens, caches, table, index, positions, output_rows, nullptr);  // fresh logits
          },
          kNoGil, py::arg("tokens"), py::arg("caches"), py::arg("table"), py::arg("step"), py::arg("positions"),
          py::arg("output_rows"));
}
