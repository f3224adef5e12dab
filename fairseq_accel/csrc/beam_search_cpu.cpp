// CPU kernels of the fast beam-search generator (fairseq_accel/inference/cpu_kernels.py wraps them).
//
// log_softmax_topk: the candidate step of beam search in one pass over each hypothesis' logits, with the
// contract of the CUDA kernel of the same name (fairseq_accel/kernels/beam_search_kernels.cu): per row,
// lp = logits - logsumexp(logits), lp[pad] = -inf, lp[unk] -= unk_penalty, eos rules (mode 1: eos -inf,
// mode 2: every token but eos -inf), NaN -> -inf; returns the k largest lp + row_bias (descending, the
// smaller token id first among equal values), their token ids and the row's logsumexp. The torch path
// materialises [rows x V] log-probabilities, masks them in place, adds the scores and sorts them: four
// passes over the largest tensor of the step and as many dispatches; this is one pass after logsumexp.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kEosForbidden = 1;
constexpr int64_t kEosOnly = 2;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// The k largest (value, id) of one row, descending; equal values keep the smaller id first.
struct TopK {
  explicit TopK(int64_t k) : values(k, kNegInf), ids(k, -1), size(0), k(k) {}

  // The value an offer must beat: -inf until k values are held (NaN never beats it).
  float threshold() const { return size < k ? kNegInf : values[k - 1]; }

  void offer(float value, int64_t id) {
    int64_t at = size < k ? size++ : k - 1;
    while (at > 0 && (value > values[at - 1] || (value == values[at - 1] && id < ids[at - 1]))) {
      values[at] = values[at - 1];
      ids[at] = ids[at - 1];
      --at;
    }
    values[at] = value;
    ids[at] = id;
  }

  std::vector<float> values;
  std::vector<int64_t> ids;
  int64_t size;
  int64_t k;
};

// The k best tokens of one row of logits under fairseq's rules (before the row's shift and bias). Ordinary
// tokens need one comparison each; pad, unk and eos are offered apart with their rules. Tokens never
// offered (NaN, or rows with fewer than k allowed tokens) leave -inf entries, filled with the lowest ids.
TopK row_topk(const float* logit, int64_t vocab, int64_t k, int64_t pad, int64_t unk, int64_t eos, float unk_penalty,
              int64_t eos_mode) {
  TopK best(k);
  if (eos_mode != kEosOnly) {
    float threshold = kNegInf;
    for (int64_t id = 0; id < vocab; ++id) {
      const float value = logit[id];
      if (value > threshold && id != pad && id != unk && id != eos) {
        best.offer(value, id);
        threshold = best.threshold();
      }
    }
    if (unk != pad && unk != eos && logit[unk] - unk_penalty > best.threshold()) best.offer(logit[unk] - unk_penalty, unk);
  }
  if (eos_mode != kEosForbidden && eos != pad && logit[eos] > best.threshold()) best.offer(logit[eos], eos);
  for (int64_t id = 0; best.size < k && id < vocab; ++id) {  // -inf entries: the lowest ids not taken
    bool taken = false;
    for (int64_t i = 0; i < best.size; ++i) taken = taken || best.ids[i] == id;
    if (!taken) best.offer(kNegInf, id);
  }
  return best;
}

}  // namespace

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> log_softmax_topk(
    const torch::Tensor& logits, const torch::Tensor& row_bias, int64_t k, int64_t pad, int64_t unk, int64_t eos,
    double unk_penalty, int64_t eos_mode) {
  TORCH_CHECK(logits.device().is_cpu() && logits.scalar_type() == torch::kFloat32 && logits.dim() == 2,
              "log_softmax_topk: logits must be a float32 CPU tensor [rows, vocab]");
  TORCH_CHECK(row_bias.device().is_cpu() && row_bias.scalar_type() == torch::kFloat32 &&
                  row_bias.dim() == 1 && row_bias.size(0) == logits.size(0),
              "log_softmax_topk: row_bias must be a float32 CPU tensor [rows]");
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(k >= 1 && k <= vocab, "log_softmax_topk: k must be in [1, vocab], got ", k);
  auto x = logits.contiguous();
  auto bias = row_bias.contiguous();
  // logsumexp of the raw logits (pad included, as fairseq's log_softmax): ATen's vectorized reduction
  auto lse = at::logsumexp(x, {1});
  auto values = torch::empty({rows, k}, x.options());
  auto indices = torch::empty({rows, k}, x.options().dtype(torch::kInt64));
  const float* in = x.data_ptr<float>();
  const float* shift = lse.data_ptr<float>();
  const float* add = bias.data_ptr<float>();
  float* out_values = values.data_ptr<float>();
  int64_t* out_ids = indices.data_ptr<int64_t>();
  const float penalty = static_cast<float>(unk_penalty);
  at::parallel_for(0, rows, 1, [&](int64_t first, int64_t last) {
    for (int64_t row = first; row < last; ++row) {
      const float row_shift = shift[row];
      if (std::isnan(row_shift)) {  // a NaN logit: every score of the row is -inf, the lowest ids first
        for (int64_t i = 0; i < k; ++i) {
          out_values[row * k + i] = kNegInf;
          out_ids[row * k + i] = i;
        }
        continue;
      }
      const TopK best = row_topk(in + row * vocab, vocab, k, pad, unk, eos, penalty, eos_mode);
      for (int64_t i = 0; i < k; ++i) {
        // (logit - lse) + bias: the torch path's order of operations
        out_values[row * k + i] = (best.values[i] - row_shift) + add[row];
        out_ids[row * k + i] = best.ids[i];
      }
    }
  });
  return {values, indices, lse};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("log_softmax_topk", &log_softmax_topk,
        "log-softmax, fairseq's token rules, row bias and top-k of every row in one pass (CPU)");
}
