// CPU kernels of the fast beam-search generator (fairseq_accel/inference/cpu_kernels.py wraps them).
//
// cache_attention_step / memory_attention: one decoding step's attention of every hypothesis over its
// self-attention cache (read through the beam indirection table: each hypothesis' own history, no mask and
// no scores against other beams' slots) and over the encoder memory its sentence's beams share. They replace
// the dozen torch ops (views, copies, matmuls, mask, softmax) each attention layer costs per step.
//
// window_convolution_step: a causal depthwise convolution's step (LSRA's lightweight convolution, SAN-M's
// FSMN memory) over each hypothesis' last inputs, gathered through the same table.
//
// log_softmax_topk: the candidate step of beam search in one pass over each hypothesis' logits, with the
// contract of the CUDA kernel of the same name (fairseq_accel/kernels/beam_search_kernels.cu): per row,
// lp = logits - logsumexp(logits), lp[pad] = -inf, lp[unk] -= unk_penalty, eos rules (mode 1: eos -inf,
// mode 2: every token but eos -inf), NaN -> -inf; returns the k largest lp + row_bias (descending, the
// smaller token id first among equal values), their token ids and the row's logsumexp. The torch path
// masks the [rows x V] log-probabilities in place, adds the scores and sorts them: three more passes over the
// largest tensor of the step and as many dispatches; this is one pass after ATen's log-softmax (which is
// 2x faster than its logsumexp on these rows, and gives the torch path's log-probabilities exactly). Where ATen
// runs its AVX-512 kernel, the log-probabilities are not stored at all: the row's max and log-sum come from
// ATen's arithmetic in ATen's order, and the top-k scan computes each value it looks at (the same bits).
#include "step_kernels.h"

#include <ATen/Parallel.h>
#include <ATen/Version.h>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

namespace {

constexpr int64_t kEosForbidden = 1;
constexpr int64_t kEosOnly = 2;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

void check_float_cpu(const torch::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.dim() == dim, name,
              " must be a float32 CPU tensor of ", dim, " dimensions");
}

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

constexpr int64_t kBlock = 16;

// The largest of x[0..kBlock), NaN left out (a block of NaN gives -inf): 4-wide SSE2 where there is SSE2.
inline float block_max(const float* x) {
#if defined(__SSE2__)
  __m128 best = _mm_set1_ps(kNegInf);
  for (int64_t i = 0; i < kBlock; i += 4) best = _mm_max_ps(_mm_loadu_ps(x + i), best);  // NaN in x: keeps best
  best = _mm_max_ps(best, _mm_movehl_ps(best, best));
  best = _mm_max_ss(best, _mm_shuffle_ps(best, best, 1));
  return _mm_cvtss_f32(best);
#else
  float best = kNegInf;
  for (int64_t i = 0; i < kBlock; ++i) best = x[i] > best ? x[i] : best;
  return best;
#endif
}

// A row of log-probabilities as given: which of a block's 16 values may enter the top k (bit i: start + i), all
// of them if its largest is above the threshold, else none (4-wide SSE2 max), and each value.
struct LogProbRow {
  uint32_t lanes_above(int64_t start, float threshold) const {
    return block_max(log_prob + start) > threshold ? 0xFFFFu : 0u;
  }
  float operator[](int64_t id) const { return log_prob[id]; }
  const float* log_prob;
};

#if defined(__GNUC__) && defined(__x86_64__)
// The same row, but exactly the values above the threshold (NaN never is): one 16-wide compare into a mask.
struct Avx512LogProbRow : LogProbRow {
  __attribute__((target("avx512f"))) uint32_t lanes_above(int64_t start, float threshold) const {
    return _mm512_cmp_ps_mask(_mm512_loadu_ps(log_prob + start), _mm512_set1_ps(threshold), _CMP_GT_OQ);
  }
};

// A row of logits read as log-probabilities, logit - max - log(sum), each computed where it is looked at, with
// ATen's operations in ATen's order (serial_vec_log_softmax_lastdim_range: (x - max) - log_sum), so every value
// is the one ATen's log-softmax would have stored.
struct Avx512ShiftedLogitRow {
  __attribute__((target("avx512f"))) uint32_t lanes_above(int64_t start, float threshold) const {
    const __m512 values = _mm512_sub_ps(_mm512_sub_ps(_mm512_loadu_ps(logits + start), _mm512_set1_ps(max)),
                                        _mm512_set1_ps(log_sum));
    return _mm512_cmp_ps_mask(values, _mm512_set1_ps(threshold), _CMP_GT_OQ);
  }
  float operator[](int64_t id) const { return (logits[id] - max) - log_sum; }
  const float* logits;
  float max, log_sum;
};
#endif

// The k best tokens of one row of log-probabilities under fairseq's rules (before the row's bias). Only the
// values a block's scan marks are looked at (each against the threshold as it rises); pad, unk and eos are
// offered apart with their rules. Tokens never offered (NaN, or rows with fewer than k allowed tokens) leave
// -inf entries, filled with the lowest ids.
template <typename Row>
inline TopK row_topk_scan(const Row& log_prob, int64_t vocab, int64_t k, int64_t pad, int64_t unk, int64_t eos,
                          float unk_penalty, int64_t eos_mode) {
  TopK best(k);
  if (eos_mode != kEosOnly) {
    float threshold = kNegInf;
    for (int64_t start = 0; start < vocab; start += kBlock) {
      const int64_t size = std::min(kBlock, vocab - start);
      uint32_t lanes = size == kBlock ? log_prob.lanes_above(start, threshold) : (1u << size) - 1u;
      for (; lanes != 0; lanes &= lanes - 1) {
        const int64_t id = start + __builtin_ctz(lanes);
        const float value = log_prob[id];
        if (value > threshold && id != pad && id != unk && id != eos) {
          best.offer(value, id);
          threshold = best.threshold();
        }
      }
    }
    if (unk != pad && unk != eos && log_prob[unk] - unk_penalty > best.threshold()) {
      best.offer(log_prob[unk] - unk_penalty, unk);
    }
  }
  if (eos_mode != kEosForbidden && eos != pad && log_prob[eos] > best.threshold()) best.offer(log_prob[eos], eos);
  for (int64_t id = 0; best.size < k && id < vocab; ++id) {  // -inf entries: the lowest ids not taken
    bool taken = false;
    for (int64_t i = 0; i < best.size; ++i) taken = taken || best.ids[i] == id;
    if (!taken) best.offer(kNegInf, id);
  }
  return best;
}

using RowTopkFunction = TopK (*)(const float*, int64_t, int64_t, int64_t, int64_t, int64_t, float, int64_t);

TopK row_topk_baseline(const float* log_prob, int64_t vocab, int64_t k, int64_t pad, int64_t unk, int64_t eos,
                       float unk_penalty, int64_t eos_mode) {
  return row_topk_scan(LogProbRow{log_prob}, vocab, k, pad, unk, eos, unk_penalty, eos_mode);
}

#if defined(__GNUC__) && defined(__x86_64__)
// flatten: the scan's compare is inlined here, where AVX-512 is enabled
__attribute__((target("avx512f"), flatten)) TopK row_topk_avx512(const float* log_prob, int64_t vocab, int64_t k,
                                                                 int64_t pad, int64_t unk, int64_t eos,
                                                                 float unk_penalty, int64_t eos_mode) {
  return row_topk_scan(Avx512LogProbRow{{log_prob}}, vocab, k, pad, unk, eos, unk_penalty, eos_mode);
}
#endif

// The AVX-512 scan where the CPU has it, chosen once at load.
RowTopkFunction best_row_topk() {
#if defined(__GNUC__) && defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return row_topk_avx512;
#endif
  return row_topk_baseline;
}

const RowTopkFunction row_topk = best_row_topk();

#if defined(__GNUC__) && defined(__x86_64__)
// ATen's AVX-512 vectors of exp and log (torch's bundled SLEEF, exported by libtorch_cpu; Vectorized<float>::exp
// and ::log call them).
extern "C" __attribute__((target("avx512f"))) __m512 Sleef_expf16_u10(__m512);
extern "C" __attribute__((target("avx512f"))) __m512 Sleef_logf16_u10(__m512);

// The vector operations of ATen's log-softmax, as functors (AVX-512 enabled in each).
struct NanPropagatingMax {  // ATen's vec::maximum: the lanes' max, NaN (all ones) where either is NaN
  __attribute__((target("avx512f"))) __m512 operator()(__m512 a, __m512 b) const {
    const __mmask16 unordered = _mm512_cmp_ps_mask(a, b, _CMP_UNORD_Q);
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(_mm512_max_ps(a, b)),
                                               _mm512_maskz_set1_epi32(unordered, -1)));
  }
};
struct Add {
  __attribute__((target("avx512f"))) __m512 operator()(__m512 a, __m512 b) const { return _mm512_add_ps(a, b); }
};
struct Unchanged {
  __attribute__((target("avx512f"))) __m512 operator()(__m512 v) const { return v; }
};
struct ExpBelow {  // exp(v - max)
  __attribute__((target("avx512f"))) __m512 operator()(__m512 v) const {
    return Sleef_expf16_u10(_mm512_sub_ps(v, _mm512_set1_ps(max)));
  }
  float max;
};

// ATen's vec_reduce_all over 16 lanes on AVX-512: halves folded by 256-, 128-, 64- and 32-bit shuffles.
template <typename Op>
__attribute__((target("avx512f"))) inline float fold_lanes(__m512 v, Op op) {
  v = op(v, _mm512_shuffle_f32x4(v, v, 0x4E));
  v = op(v, _mm512_shuffle_f32x4(v, v, 0xB1));
  v = op(v, _mm512_shuffle_ps(v, v, 0x4E));
  v = op(v, _mm512_shuffle_ps(v, v, 0xB1));
  return _mm512_cvtss_f32(v);
}

// ATen's map_reduce_all / reduce_all (size >= 16): the first vector, then one per 16 values, a masked last one
// whose lanes past the row keep the accumulator's.
template <typename Map, typename Op>
__attribute__((target("avx512f"))) inline float map_fold(const float* x, int64_t size, Map map, Op op) {
  __m512 acc = map(_mm512_loadu_ps(x));
  int64_t d = 16;
  for (; d < size - size % 16; d += 16) acc = op(acc, map(_mm512_loadu_ps(x + d)));
  if (size - d > 0) {
    const auto tail = static_cast<__mmask16>((1u << (size - d)) - 1u);
    acc = _mm512_mask_mov_ps(acc, tail, op(acc, map(_mm512_maskz_loadu_ps(tail, x + d))));
  }
  return fold_lanes(acc, op);
}

// A row's max and log(sum(exp(x - max))) as ATen's AVX-512 log-softmax computes them (size >= 16), bit for bit
// (aten/src/ATen/native/cpu/LogSoftmaxKernelImpl.h, ATen/cpu/vec/functional_base.h of torch 2.13).
__attribute__((target("avx512f"))) std::pair<float, float> log_softmax_shift_avx512(const float* x, int64_t size) {
  const float max = map_fold(x, size, Unchanged{}, NanPropagatingMax{});
  const float sum = map_fold(x, size, ExpBelow{max}, Add{});
  return {max, _mm512_cvtss_f32(Sleef_logf16_u10(_mm512_set1_ps(sum)))};
}

// The top k of a row of logits without storing its log-probabilities: ATen's max and log-sum, then the scan
// computing each value it looks at.
__attribute__((target("avx512f"), flatten)) TopK logits_topk_avx512(const float* logits, int64_t vocab, int64_t k,
                                                                    int64_t pad, int64_t unk, int64_t eos,
                                                                    float unk_penalty, int64_t eos_mode,
                                                                    float* shift) {
  const auto [max, log_sum] = log_softmax_shift_avx512(logits, vocab);
  const Avx512ShiftedLogitRow row{logits, max, log_sum};
  *shift = logits[0] - row[0];  // logit - log-probability, of any token
  return row_topk_scan(row, vocab, k, pad, unk, eos, unk_penalty, eos_mode);
}
#endif

// Whether log_softmax_topk may compute ATen's log-probabilities itself: ATen runs its AVX-512 kernels here
// (ATEN_CPU_CAPABILITY can lower them, and a CPU may lack AVX-512), so its arithmetic is the one reproduced.
bool aten_log_softmax_is_avx512() {
#if defined(__GNUC__) && defined(__x86_64__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && at::get_cpu_capability() == "AVX512";
#else
  return false;
#endif
}

}  // namespace

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> log_softmax_topk(
    const torch::Tensor& logits, const torch::Tensor& row_bias, int64_t k, int64_t pad, int64_t unk, int64_t eos,
    double unk_penalty, int64_t eos_mode) {
  check_float_cpu(logits, "logits", 2);
  check_float_cpu(row_bias, "row_bias", 1);
  TORCH_CHECK(row_bias.size(0) == logits.size(0), "row_bias must have one value per row of logits");
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(k >= 1 && k <= vocab, "log_softmax_topk: k must be in [1, vocab], got ", k);
  auto x = logits.contiguous();
  auto bias = row_bias.contiguous();
  auto lse = torch::empty({rows}, x.options());
  auto values = torch::empty({rows, k}, x.options());
  auto indices = torch::empty({rows, k}, x.options().dtype(torch::kInt64));
  const float* raw = x.data_ptr<float>();
  float* shift = lse.data_ptr<float>();
  const float* add = bias.data_ptr<float>();
  float* out_values = values.data_ptr<float>();
  int64_t* out_ids = indices.data_ptr<int64_t>();
  const float penalty = static_cast<float>(unk_penalty);
  const auto store = [&](int64_t row, const TopK& best) {
    for (int64_t j = 0; j < k; ++j) {
      out_values[row * k + j] = best.values[j] + add[row];  // the torch path's lprobs + scores
      out_ids[row * k + j] = best.ids[j];
    }
  };
#if defined(__GNUC__) && defined(__x86_64__)
  // where ATen's log-softmax is its AVX-512 kernel, its values are computed here where the scan looks at them:
  // two passes over each row (max; sum of exp) and the scan, instead of ATen's three and a scan of what it stored
  static const bool fused = aten_log_softmax_is_avx512();
  if (fused && vocab >= 16) {
    at::parallel_for(0, rows, parallel_grain(8 * vocab), [&](int64_t first, int64_t last) {
      for (int64_t row = first; row < last; ++row)
        store(row, logits_topk_avx512(raw + row * vocab, vocab, k, pad, unk, eos, penalty, eos_mode, shift + row));
    });
    return {values, indices, lse};
  }
#endif
  // log-probabilities over the whole vocabulary (pad included, as fairseq's): ATen's vectorized kernel (each row's
  // values are those of one call over all rows), each thread on its own rows, a chunk at a time into its ~256 KiB
  // buffer (cache-resident when scanned), kept from call to call (a fresh one each step cost a large malloc and
  // glibc's consolidation of its bins); inside the threads' loop ATen's kernel stays on its thread: one fork
  // and join per step for both passes
  const int64_t chunk = std::min(rows, std::max<int64_t>(1, (256 * 1024) / (vocab * 4)));
  at::parallel_for(0, rows, parallel_grain(8 * vocab), [&](int64_t first, int64_t last) {
    thread_local std::vector<float> buffer;
    buffer.resize(chunk * vocab);
    for (int64_t start = first; start < last; start += chunk) {
      const int64_t count = std::min(chunk, last - start);
      auto part = torch::from_blob(buffer.data(), {count, vocab}, x.options());
      at::_log_softmax_out(part, x.narrow(0, start, count), 1, false);
      const float* in = buffer.data();
      for (int64_t i = 0; i < count; ++i) {
        const int64_t row = start + i;
        shift[row] = raw[row * vocab] - in[i * vocab];  // logit - log-probability, of any token
        // a NaN logit makes the row's log-probabilities NaN: none is offered, the row is -inf, lowest ids first
        store(row, row_topk(in + i * vocab, vocab, k, pad, unk, eos, penalty, eos_mode));
      }
    }
  });
  return {values, indices, lse};
}

namespace {

// The tensor's data as a contiguous CPU tensor of the given type, or a one-line error naming it.
void check_cpu(const torch::Tensor& t, const char* name, torch::ScalarType type, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == type && t.dim() == dim && t.is_contiguous(), name,
              " must be a contiguous ", c10::toString(type), " CPU tensor of ", dim, " dimensions");
}

}  // namespace

// A sentence's candidates from its rows' best k (log_softmax_topk's values, the row's score added, and token
// ids; [B * r, k], r = 1 at the first step, else beam): its best k over r x k, descending, equal values in
// row-major order (torch.topk over the flattened rows gives the same up to the order of equal values).
// Returns (scores [B, k], token ids [B, k], source beams [B, k], eos mask [B, k], whether any of the first
// `beam` candidates ends); the eos mask is fairseq's: an eos token with a finite score, and among the first
// `beam` only where cands_to_ignore [B, beam] is false.
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, bool> merge_candidates(
    const torch::Tensor& values, const torch::Tensor& ids, const torch::Tensor& cands_to_ignore, int64_t eos) {
  check_cpu(values, "values", torch::kFloat32, 2);
  check_cpu(ids, "ids", torch::kInt64, 2);
  check_cpu(cands_to_ignore, "cands_to_ignore", torch::kBool, 2);
  const int64_t batch = cands_to_ignore.size(0), beam = cands_to_ignore.size(1), k = values.size(1);
  TORCH_CHECK(ids.sizes() == values.sizes() && values.size(0) % batch == 0 && k >= beam,
              "values and ids must be [B * r, k] with k >= beam");
  const int64_t rows = values.size(0) / batch, pool = rows * k;
  auto scores = torch::empty({batch, k}, values.options());
  auto tokens = torch::empty({batch, k}, ids.options());
  auto beams = torch::empty({batch, k}, ids.options());
  auto eos_mask = torch::empty({batch, k}, cands_to_ignore.options());
  const float* value_p = values.data_ptr<float>();
  const int64_t* id_p = ids.data_ptr<int64_t>();
  const bool* ignore_p = cands_to_ignore.data_ptr<bool>();
  float* score_out = scores.data_ptr<float>();
  int64_t *token_out = tokens.data_ptr<int64_t>(), *beam_out = beams.data_ptr<int64_t>();
  bool* eos_out = eos_mask.data_ptr<bool>();
  bool ending = false;
  std::vector<int64_t> order(pool);
  for (int64_t b = 0; b < batch; ++b) {
    const float* v = value_p + b * pool;
    for (int64_t i = 0; i < pool; ++i) order[i] = i;
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [v](int64_t x, int64_t y) {
      return v[x] > v[y] || (v[x] == v[y] && x < y);  // NaN never leaves the kernel: its rows are -inf
    });
    for (int64_t j = 0; j < k; ++j) {
      const int64_t at = b * k + j, from = order[j];
      score_out[at] = v[from];
      token_out[at] = id_p[b * pool + from];
      beam_out[at] = from / k;
      eos_out[at] = token_out[at] == eos && score_out[at] != kNegInf && !(j < beam && ignore_p[b * beam + j]);
      ending = ending || (j < beam && eos_out[at]);
    }
  }
  return {scores, tokens, beams, eos_mask, ending};
}

// fairseq's beam advance: each sentence goes on with its first `beam` candidates that do not end (eos_mask, with
// cands_to_ignore [B, beam] counted as ending among the first `beam`), then ending ones if there are fewer.
// Updates cands_to_ignore (which continuations are ending ones), the histories tokens [B * beam, L] (int64, the
// new token at step + 1) and scores [B * beam, L'] (float32, the new score at step) in place; returns the parent
// beam of each continuation [B, beam].
torch::Tensor advance_beams(const torch::Tensor& cand_scores, const torch::Tensor& cand_tokens,
                            const torch::Tensor& cand_beams, const torch::Tensor& eos_mask,
                            torch::Tensor& cands_to_ignore, torch::Tensor& tokens, torch::Tensor& scores,
                            int64_t step) {
  check_cpu(cand_scores, "cand_scores", torch::kFloat32, 2);
  check_cpu(cand_tokens, "cand_tokens", torch::kInt64, 2);
  check_cpu(cand_beams, "cand_beams", torch::kInt64, 2);
  check_cpu(eos_mask, "eos_mask", torch::kBool, 2);
  check_cpu(cands_to_ignore, "cands_to_ignore", torch::kBool, 2);
  check_cpu(tokens, "tokens", torch::kInt64, 2);
  check_cpu(scores, "scores", torch::kFloat32, 2);
  const int64_t batch = cands_to_ignore.size(0), beam = cands_to_ignore.size(1), k = cand_scores.size(1);
  TORCH_CHECK(cand_scores.size(0) == batch && cand_tokens.sizes() == cand_scores.sizes() &&
              cand_beams.sizes() == cand_scores.sizes() && eos_mask.sizes() == cand_scores.sizes() && k >= beam,
              "the candidates must be [B, k] with k >= beam");
  TORCH_CHECK(tokens.size(0) == batch * beam && scores.size(0) == batch * beam && step + 1 < tokens.size(1) &&
              step < scores.size(1), "tokens/scores must be [B * beam, L] with room for step ", step);
  auto parents = torch::empty({batch, beam}, cand_beams.options());
  const float* score_p = cand_scores.data_ptr<float>();
  const int64_t *token_p = cand_tokens.data_ptr<int64_t>(), *beam_p = cand_beams.data_ptr<int64_t>();
  const bool* eos_p = eos_mask.data_ptr<bool>();
  bool* ignore_p = cands_to_ignore.data_ptr<bool>();
  int64_t* parent_p = parents.data_ptr<int64_t>();
  int64_t* history = tokens.data_ptr<int64_t>();
  float* history_scores = scores.data_ptr<float>();
  const int64_t token_width = tokens.size(1), score_width = scores.size(1);
  std::vector<int64_t> active(beam), old_tokens(beam * (step + 1));
  std::vector<float> old_scores(beam * step);
  for (int64_t b = 0; b < batch; ++b) {
    int64_t taken = 0;
    for (int pass = 0; pass < 2 && taken < beam; ++pass) {  // pass 0: continuing candidates, pass 1: ending ones
      for (int64_t j = 0; j < k && taken < beam; ++j) {
        const bool ends = eos_p[b * k + j] || (j < beam && ignore_p[b * beam + j]);
        if (ends == (pass == 1)) active[taken++] = j;
      }
    }
    int64_t* rows = history + b * beam * token_width;
    float* row_scores = history_scores + b * beam * score_width;
    for (int64_t i = 0; i < beam; ++i) {
      std::copy(rows + i * token_width, rows + i * token_width + step + 1, old_tokens.begin() + i * (step + 1));
      std::copy(row_scores + i * score_width, row_scores + i * score_width + step, old_scores.begin() + i * step);
    }
    for (int64_t i = 0; i < beam; ++i) {
      const int64_t j = active[i], parent = beam_p[b * k + j];
      const bool ends = eos_p[b * k + j] || (j < beam && ignore_p[b * beam + j]);
      parent_p[b * beam + i] = parent;
      std::copy(old_tokens.begin() + parent * (step + 1), old_tokens.begin() + (parent + 1) * (step + 1),
                rows + i * token_width);
      rows[i * token_width + step + 1] = token_p[b * k + j];
      std::copy(old_scores.begin() + parent * step, old_scores.begin() + (parent + 1) * step,
                row_scores + i * score_width);
      row_scores[i * score_width + step] = score_p[b * k + j];
      active[i] = ends;  // read below, after every candidate's own test used the old cands_to_ignore
    }
    for (int64_t i = 0; i < beam; ++i) ignore_p[b * beam + i] = active[i] != 0;
  }
  return parents;
}

// The beam indirection table ([B, beam, T] int64, in place) after a step: hypothesis i of sentence b continues
// hypothesis parents[b, i] ([B, beam] int64), so its slots of steps 0..steps-1 become that one's. One call
// instead of expand + gather + a sliced copy per step (beam_cache.BeamIndirection.advance's torch path).
void advance_table(torch::Tensor& table, const torch::Tensor& parents, int64_t steps) {
  check_cpu(table, "table", torch::kInt64, 3);
  check_cpu(parents, "parents", torch::kInt64, 2);
  const int64_t batch = table.size(0), beam = table.size(1), max_steps = table.size(2);
  TORCH_CHECK(parents.size(0) == batch && parents.size(1) == beam, "parents must be [B, beam] for a table of ",
              batch, " x ", beam);
  TORCH_CHECK(steps >= 0 && steps <= max_steps, "steps ", steps, " outside the table's ", max_steps);
  int64_t* table_p = table.data_ptr<int64_t>();
  const int64_t* parent_p = parents.data_ptr<int64_t>();
  for (int64_t i = 0; i < batch * beam; ++i)  // all checked before any is applied: a bad one leaves the table as is
    TORCH_CHECK(parent_p[i] >= 0 && parent_p[i] < beam, "parent ", parent_p[i], " outside the beam of ", beam);
  std::vector<int64_t> before(beam * steps);
  for (int64_t b = 0; b < batch; ++b) {
    int64_t* sentence = table_p + b * beam * max_steps;
    for (int64_t i = 0; i < beam; ++i) std::copy(sentence + i * max_steps, sentence + i * max_steps + steps,
                                                 before.begin() + i * steps);
    for (int64_t i = 0; i < beam; ++i) {
      const int64_t parent = parent_p[b * beam + i];
      std::copy(before.begin() + parent * steps, before.begin() + (parent + 1) * steps, sentence + i * max_steps);
    }
  }
}

// Moves the rows `sentences` (increasing indices into dim 0) of the contiguous CPU `buffer` to its front, in
// place, copying only the first `steps` entries of dim `time_dim` (those written so far); returns the front rows.
// One call instead of index_select + copy_ (two copies and an allocation) when sentences leave the batch.
torch::Tensor compact_sentences(torch::Tensor& buffer, const torch::Tensor& sentences, int64_t time_dim,
                                int64_t steps) {
  TORCH_CHECK(buffer.device().is_cpu() && buffer.is_contiguous(), "buffer must be a contiguous CPU tensor");
  check_cpu(sentences, "sentences", torch::kInt64, 1);
  TORCH_CHECK(time_dim >= 1 && time_dim < buffer.dim(), "time_dim ", time_dim, " outside the buffer's dims 1..",
              buffer.dim() - 1);
  const int64_t times = buffer.size(time_dim), kept = sentences.numel();
  TORCH_CHECK(steps >= 0 && steps <= times, "steps ", steps, " outside the buffer's ", times);
  int64_t outer = 1, inner = buffer.element_size();
  for (int64_t d = 1; d < time_dim; ++d) outer *= buffer.size(d);
  for (int64_t d = time_dim + 1; d < buffer.dim(); ++d) inner *= buffer.size(d);
  const int64_t block = times * inner, row = outer * block;
  const int64_t* order = sentences.data_ptr<int64_t>();
  char* base = static_cast<char*>(buffer.data_ptr());
  for (int64_t i = 0, previous = -1; i < kept; previous = order[i++]) {
    TORCH_CHECK(order[i] > previous && order[i] < buffer.size(0), "sentences must be increasing row indices");
    if (order[i] == i) continue;
    char* to = base + i * row;  // rows before order[i]: never read again
    const char* from = base + order[i] * row;
    if (steps == times) {
      std::memcpy(to, from, row);
    } else {
      for (int64_t o = 0; o < outer; ++o) std::memcpy(to + o * block, from + o * block, steps * inner);
    }
  }
  return buffer.narrow(0, 0, kept);
}

namespace {

// The largest of scores[0..n) (NaN ignored; -inf for none). From 16 scores on, as 16 running maxima folded
// pairwise, so that the loop vectorizes: a single running maximum is a chain of dependent compares that GCC keeps
// scalar (~12 % of the int8 self-attention of a 200-step decode, perf 2026-12-01). Where the largest is a zero, its
// sign may differ from a single running maximum's: exp(0 - 0) is 1 either way.
__attribute__((always_inline)) inline float largest_score(const float* scores, int64_t n) {
  float largest = kNegInf;
  int64_t t = 0;
  if (n >= 16) {
    float lanes[16];
    for (int j = 0; j < 16; ++j) lanes[j] = kNegInf;
    for (; t + 16 <= n; t += 16)
      for (int j = 0; j < 16; ++j) lanes[j] = scores[t + j] > lanes[j] ? scores[t + j] : lanes[j];
    for (int width = 8; width >= 1; width /= 2)
      for (int j = 0; j < width; ++j) lanes[j] = lanes[j + width] > lanes[j] ? lanes[j + width] : lanes[j];
    largest = lanes[0];
  }
  for (; t < n; ++t) largest = scores[t] > largest ? scores[t] : largest;
  return largest;
}

// scores[0..n) <- softmax(scores), entries of -inf (left out) giving 0. exp(x) for x <= 0 branch-free: x = k ln2 + r,
// exp(r) by Cephes' expf polynomial (S. L. Moshier, Cephes Math Library, expf.c), 2^k from the exponent bits; within
// 2 ulp of std::exp, ~1e-38 instead of 0 below -87.3 (where expf underflows). Returns the sum of the exponentials,
// which the caller divides by. Written so that the loops vectorize (builtins, not std:: calls, which an ISA-specific
// caller below cannot inline; setup.py compiles with -fno-trapping-math), but for the sum, whose order is the
// result's.
__attribute__((always_inline)) inline float exponentiate(float* scores, int64_t n) {
  const float largest = largest_score(scores, n);
  for (int64_t t = 0; t < n; ++t) {
    float x = scores[t] - largest;
    x = x < -87.3f ? -87.3f : x;
    const float k = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
    const float r = (x - k * 0.693359375f) - k * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const float e = p * __builtin_bit_cast(float, (static_cast<int32_t>(k) + 127) << 23);
    scores[t] = scores[t] == kNegInf ? 0.f : e;
  }
  float total = 0;
  for (int64_t t = 0; t < n; ++t) total += scores[t];
  return total;
}

// nearbyint(clamp(x, low, high)) for integer bounds within +-2^22, without a libm call, so that the loops around it
// vectorize: adding and subtracting 1.5 * 2^23 rounds to the nearest integer, ties to even, as nearbyint does in the
// default rounding mode (the extension is not built with -ffast-math, which would fold the two away); clamping
// before rounding gives what clamping after it gives, the bounds being integers.
inline float round_clamped(float x, float low, float high) {
  constexpr float kRoundingShift = 12582912.f;
  const float y = std::min(std::max(x, low), high);
  return (y + kRoundingShift) - kRoundingShift;
}

// out[i] = the int8 level of x[i] * factor[i], round_clamped to -128..127 (Int8Linear.forward_levels' formula).
// Restrict pointers let the compiler keep the pointers in registers and vectorize the loop (through the lambdas'
// captured references it reloaded them from the stack at every value).
inline void write_levels(const float* __restrict x, const float* __restrict factor, int8_t* __restrict out,
                         int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<int8_t>(round_clamped(x[i] * factor[i], -128.f, 127.f));
}

// q . k over d values (float32 or int8 keys): 16 independent sums reduced pairwise, so that the loop vectorizes.
template <typename Key>
__attribute__((always_inline)) inline float dot(const float* q, const Key* k, int64_t d) {
  float sums[16] = {};
  int64_t i = 0;
  for (; i + 16 <= d; i += 16) {
    for (int j = 0; j < 16; ++j) sums[j] += q[i + j] * static_cast<float>(k[i + j]);
  }
  float halves[8], quarters[4];
  for (int j = 0; j < 8; ++j) halves[j] = sums[j] + sums[j + 8];
  for (int j = 0; j < 4; ++j) quarters[j] = halves[j] + halves[j + 4];
  float total = (quarters[0] + quarters[2]) + (quarters[1] + quarters[3]);
  for (; i < d; ++i) total += q[i] * static_cast<float>(k[i]);
  return total;
}

// out[0..d) = sum_t softmax(q . keys[t])_t values[t] over n key/value rows (pointers), the rows `masked` names
// left out (nullptr: none); scores: n floats of scratch.
__attribute__((always_inline)) inline void attend_body(const float* q, const float* const* keys,
                                                      const float* const* values, const bool* masked, int64_t n,
                                                      int64_t d, float* scores, float* out) {
  for (int64_t t = 0; t < n; ++t) scores[t] = masked != nullptr && masked[t] ? kNegInf : dot(q, keys[t], d);
  const float total = exponentiate(scores, n);
  for (int64_t i = 0; i < d; ++i) out[i] = 0.f;
  for (int64_t t = 0; t < n; ++t) {
    const float p = scores[t] / total;
    const float* v = values[t];
    for (int64_t i = 0; i < d; ++i) out[i] += p * v[i];
  }
}

// The same over int8 keys and values with one scale per row (the int8 cache): scores (q . k8[t]) k_scale[t],
// out = sum_t p_t v_scale[t] v8[t]; no row is left out.
__attribute__((always_inline)) inline void attend_int8_body(const float* q, const int8_t* const* keys,
                                                           const float* key_scales, const int8_t* const* values,
                                                           const float* value_scales, int64_t n, int64_t d,
                                                           float* scores, float* out) {
  for (int64_t t = 0; t < n; ++t) scores[t] = dot(q, keys[t], d) * key_scales[t];
  const float total = exponentiate(scores, n);
  for (int64_t i = 0; i < d; ++i) out[i] = 0.f;
  for (int64_t t = 0; t < n; ++t) {
    const float p = scores[t] / total * value_scales[t];
    const int8_t* v = values[t];
    for (int64_t i = 0; i < d; ++i) out[i] += p * static_cast<float>(v[i]);
  }
}

using AttendFunction = void (*)(const float*, const float* const*, const float* const*, const bool*, int64_t, int64_t,
                                float*, float*);

// attend_body compiled for the baseline ISA and, on x86-64, for AVX2 + FMA and AVX-512; the best the CPU (and its
// OS) supports is chosen once when the module loads.
void attend_baseline(const float* q, const float* const* keys, const float* const* values, const bool* masked,
                     int64_t n, int64_t d, float* scores, float* out) {
  attend_body(q, keys, values, masked, n, d, scores, out);
}

#if defined(__GNUC__) && defined(__x86_64__)
__attribute__((target("avx2,fma"))) void attend_avx2(const float* q, const float* const* keys,
                                                     const float* const* values, const bool* masked, int64_t n,
                                                     int64_t d, float* scores, float* out) {
  attend_body(q, keys, values, masked, n, d, scores, out);
}

// AVX-512 attention for heads of up to 64 values: the query, the output and a key or value row fit in at most four
// registers (the last one masked), the scores of 16 keys come from 16 lane-wise products folded into one register
// by a shuffle tree (about three instructions per key instead of a 16-lane reduction each: on 40-wide heads the
// generic loop, with its scalar tail, ran at ~4 GMAC/s), and the weighted sum of the values stays in registers.

__attribute__((target("avx512f"), always_inline)) inline __mmask16 lanes_mask(int64_t count) {
  return static_cast<__mmask16>((1u << count) - 1u);
}

// 16 lanes of a key or value row as float32 (masked lanes 0).
__attribute__((target("avx512f"), always_inline)) inline __m512 load_lanes(const float* row, __mmask16 keep) {
  return _mm512_maskz_loadu_ps(keep, row);
}
__attribute__((target("avx512f,avx512bw,avx512vl"), always_inline)) inline __m512 load_lanes(const int8_t* row,
                                                                                             __mmask16 keep) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(keep, row)));
}

// The lane sums of 16 registers, in one register: pairs are halved by shuffles and adds at four levels, which
// leaves key j + 4 m in lane 4 j + m; the permutation puts key t in lane t.
__attribute__((target("avx512f"), always_inline)) inline __m512 fold_16_sums(const __m512* sums) {
  __m512 halves[8], quarters[4], eighths[2];
  for (int i = 0; i < 8; ++i)
    halves[i] = _mm512_add_ps(_mm512_shuffle_f32x4(sums[2 * i], sums[2 * i + 1], 0x44),
                              _mm512_shuffle_f32x4(sums[2 * i], sums[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)
    quarters[i] = _mm512_add_ps(_mm512_shuffle_f32x4(halves[2 * i], halves[2 * i + 1], 0x88),
                                _mm512_shuffle_f32x4(halves[2 * i], halves[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)
    eighths[i] = _mm512_add_ps(_mm512_shuffle_ps(quarters[2 * i], quarters[2 * i + 1], 0x44),
                               _mm512_shuffle_ps(quarters[2 * i], quarters[2 * i + 1], 0xEE));
  const __m512 folded = _mm512_add_ps(_mm512_shuffle_ps(eighths[0], eighths[1], 0x88),
                                      _mm512_shuffle_ps(eighths[0], eighths[1], 0xDD));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, folded);
}

// Which lanes of each of the Vectors registers hold one of a head's d values (all but the last register full).
template <int Vectors>
__attribute__((target("avx512f"), always_inline)) inline void head_lanes(int64_t d, __mmask16* keep) {
  for (int v = 0; v < Vectors; ++v) keep[v] = v + 1 < Vectors ? lanes_mask(16) : lanes_mask(d - 16 * (Vectors - 1));
}

// The lane-wise products q * key over the Vectors registers, summed lane by lane.
template <int Vectors, typename Key>
__attribute__((target("avx512f,avx512bw,avx512vl,fma"), always_inline)) inline __m512 lane_products(
    const __m512* query, const __mmask16* keep, const Key* key) {
  __m512 sum = _mm512_mul_ps(query[0], load_lanes(key, keep[0]));
  for (int v = 1; v < Vectors; ++v) sum = _mm512_fmadd_ps(query[v], load_lanes(key + 16 * v, keep[v]), sum);
  return sum;
}

// scores[t] = q . keys[t] * key_scales[t] (no scales: 1) over d <= 16 * Vectors values.
template <int Vectors, typename Key>
__attribute__((target("avx512f,avx512bw,avx512vl,fma"), always_inline)) inline void register_scores(
    const float* q, const Key* const* keys, const float* key_scales, int64_t n, int64_t d, float* scores) {
  __mmask16 keep[Vectors];
  head_lanes<Vectors>(d, keep);
  __m512 query[Vectors];
  for (int v = 0; v < Vectors; ++v) query[v] = _mm512_maskz_loadu_ps(keep[v], q + 16 * v);
  int64_t t = 0;
  for (; t + 16 <= n; t += 16) {
    __m512 sums[16];
    for (int j = 0; j < 16; ++j) sums[j] = lane_products<Vectors>(query, keep, keys[t + j]);
    __m512 folded = fold_16_sums(sums);
    if (key_scales != nullptr) folded = _mm512_mul_ps(folded, _mm512_loadu_ps(key_scales + t));
    _mm512_storeu_ps(scores + t, folded);
  }
  for (; t < n; ++t)
    scores[t] = _mm512_reduce_add_ps(lane_products<Vectors>(query, keep, keys[t])) *
                (key_scales != nullptr ? key_scales[t] : 1.f);
}

// out = sum_t weights[t] * values[t] over d <= 16 * Vectors values.
template <int Vectors, typename Value>
__attribute__((target("avx512f,avx512bw,avx512vl,fma"), always_inline)) inline void register_weighted_sum(
    const float* weights, const Value* const* values, int64_t n, int64_t d, float* out) {
  __mmask16 keep[Vectors];
  head_lanes<Vectors>(d, keep);
  __m512 sum[Vectors];
  for (int v = 0; v < Vectors; ++v) sum[v] = _mm512_setzero_ps();
  for (int64_t t = 0; t < n; ++t) {
    const __m512 weight = _mm512_set1_ps(weights[t]);
    for (int v = 0; v < Vectors; ++v)
      sum[v] = _mm512_fmadd_ps(weight, load_lanes(values[t] + 16 * v, keep[v]), sum[v]);
  }
  for (int v = 0; v < Vectors; ++v) _mm512_mask_storeu_ps(out + 16 * v, keep[v], sum[v]);
}

// softmax(scores) (left-out rows: -inf, weight 0), times value_scales where given, into scores, then the weighted
// sum of the values.
template <int Vectors, typename Key, typename Value>
__attribute__((target("avx512f,avx512bw,avx512vl,fma"), always_inline)) inline void register_attend(
    const float* q, const Key* const* keys, const float* key_scales, const Value* const* values,
    const float* value_scales, const bool* masked, int64_t n, int64_t d, float* scores, float* out) {
  register_scores<Vectors>(q, keys, key_scales, n, d, scores);
  if (masked != nullptr)
    for (int64_t t = 0; t < n; ++t) scores[t] = masked[t] ? kNegInf : scores[t];
  const float total = exponentiate(scores, n);
  for (int64_t t = 0; t < n; ++t) scores[t] = scores[t] / total * (value_scales != nullptr ? value_scales[t] : 1.f);
  register_weighted_sum<Vectors>(scores, values, n, d, out);
}

// register_attend where d <= 64 (one instance per register count); false for wider heads.
template <typename Key, typename Value>
__attribute__((target("avx512f,avx512bw,avx512vl,fma"), always_inline)) inline bool attend_in_registers(
    const float* q, const Key* const* keys, const float* key_scales, const Value* const* values,
    const float* value_scales, const bool* masked, int64_t n, int64_t d, float* scores, float* out) {
  switch ((d + 15) / 16) {
    case 1: register_attend<1>(q, keys, key_scales, values, value_scales, masked, n, d, scores, out); return true;
    case 2: register_attend<2>(q, keys, key_scales, values, value_scales, masked, n, d, scores, out); return true;
    case 3: register_attend<3>(q, keys, key_scales, values, value_scales, masked, n, d, scores, out); return true;
    case 4: register_attend<4>(q, keys, key_scales, values, value_scales, masked, n, d, scores, out); return true;
    default: return false;
  }
}

__attribute__((target("avx512f,avx512vl,avx512bw,avx2,fma"))) void attend_avx512(
    const float* q, const float* const* keys, const float* const* values, const bool* masked, int64_t n, int64_t d,
    float* scores, float* out) {
  if (!attend_in_registers(q, keys, nullptr, values, nullptr, masked, n, d, scores, out))
    attend_body(q, keys, values, masked, n, d, scores, out);
}
#endif

AttendFunction best_attend() {
#if defined(__GNUC__) && defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl")) return attend_avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return attend_avx2;
#endif
  return attend_baseline;
}

using AttendInt8Function = void (*)(const float*, const int8_t* const*, const float*, const int8_t* const*,
                                    const float*, int64_t, int64_t, float*, float*);

void attend_int8_baseline(const float* q, const int8_t* const* keys, const float* key_scales,
                          const int8_t* const* values, const float* value_scales, int64_t n, int64_t d, float* scores,
                          float* out) {
  attend_int8_body(q, keys, key_scales, values, value_scales, n, d, scores, out);
}

#if defined(__GNUC__) && defined(__x86_64__)
__attribute__((target("avx2,fma"))) void attend_int8_avx2(const float* q, const int8_t* const* keys,
                                                          const float* key_scales, const int8_t* const* values,
                                                          const float* value_scales, int64_t n, int64_t d,
                                                          float* scores, float* out) {
  attend_int8_body(q, keys, key_scales, values, value_scales, n, d, scores, out);
}

__attribute__((target("avx512f,avx512vl,avx512bw,avx2,fma"))) void attend_int8_avx512(
    const float* q, const int8_t* const* keys, const float* key_scales, const int8_t* const* values,
    const float* value_scales, int64_t n, int64_t d, float* scores, float* out) {
  if (!attend_in_registers(q, keys, key_scales, values, value_scales, nullptr, n, d, scores, out))
    attend_int8_body(q, keys, key_scales, values, value_scales, n, d, scores, out);
}
#endif

AttendInt8Function best_attend_int8() {
#if defined(__GNUC__) && defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw"))
    return attend_int8_avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return attend_int8_avx2;
#endif
  return attend_int8_baseline;
}

const AttendFunction attend = best_attend();
const AttendInt8Function attend_int8 = best_attend_int8();

// [rows, H, D] with unit stride along D and H stride D (the query/key/value views a fused projection's output
// unbinds into, rows apart by 3 H D), as it is; anything else as a contiguous copy. Returns it and its row stride.
std::pair<torch::Tensor, int64_t> rows_of_heads(const torch::Tensor& t) {
  if (t.stride(2) == 1 && t.stride(1) == t.size(2)) return {t, t.stride(0)};
  auto copy = t.contiguous();
  return {copy, copy.stride(0)};
}

}  // namespace

// Writes the step's keys and values ([B * beam, H, D]) into each hypothesis' own slot of the caches
// ([B, H, T, beam, D], contiguous) and returns the attention ([B * beam, H, D]) of the (pre-scaled) queries
// over each hypothesis' steps 0..step, whose slots table ([B, beam, T], int64) names.
torch::Tensor cache_attention_step(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                   const torch::Tensor& keys, const torch::Tensor& values, const torch::Tensor& table,
                                   int64_t step, const std::optional<torch::Tensor>& given_out) {
  check_float_cpu(q, "q", 3);
  check_float_cpu(keys, "keys", 5);
  check_float_cpu(values, "values", 5);
  TORCH_CHECK(keys.is_contiguous() && values.is_contiguous(), "the caches must be contiguous");
  TORCH_CHECK(table.scalar_type() == torch::kInt64 && table.dim() == 3, "table must be int64 [B, beam, T]");
  const int64_t batch = keys.size(0), heads = keys.size(1), max_steps = keys.size(2), beam = keys.size(3),
                dim = keys.size(4), rows = batch * beam;
  TORCH_CHECK(q.size(0) == rows && q.size(1) == heads && q.size(2) == dim, "q must be [B * beam, H, D]");
  TORCH_CHECK(step >= 0 && step < max_steps, "step ", step, " outside the cache's ", max_steps, " steps");
  check_float_cpu(k, "k", 3);
  check_float_cpu(v, "v", 3);
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(), "q, k and v must all be [B * beam, H, D]");
  const auto [query, q_row] = rows_of_heads(q);  // the fused projection's views: no copies
  const auto [key, k_row] = rows_of_heads(k);
  const auto [value, v_row] = rows_of_heads(v);
  auto slots = table.contiguous();
  auto out = output_of(given_out, {rows, heads, dim}, "cache_attention_step");
  const float *qp = query.data_ptr<float>(), *kp = key.data_ptr<float>(), *vp = value.data_ptr<float>();
  float *keys_p = keys.data_ptr<float>(), *values_p = values.data_ptr<float>(), *out_p = out.data_ptr<float>();
  const int64_t* slot_p = slots.data_ptr<int64_t>();
  const int64_t table_steps = slots.size(2);
  // cache offset of (b, h, t, slot)
  auto at_cache = [=](int64_t b, int64_t h, int64_t t, int64_t slot) {
    return (((b * heads + h) * max_steps + t) * beam + slot) * dim;
  };
  at::parallel_for(0, rows * heads, parallel_grain(2 * dim), [&](int64_t first, int64_t last) {
    for (int64_t index = first; index < last; ++index) {  // the write of (row, head)
      const int64_t row = index / heads, h = index % heads, b = row / beam, slot = row % beam;
      const float* k_in = kp + row * k_row + h * dim;
      const float* v_in = vp + row * v_row + h * dim;
      std::copy(k_in, k_in + dim, keys_p + at_cache(b, h, step, slot));
      std::copy(v_in, v_in + dim, values_p + at_cache(b, h, step, slot));
    }
  });
  at::parallel_for(0, rows * heads, parallel_grain(2 * (step + 1) * dim), [&](int64_t first, int64_t last) {
    std::vector<float> scores(step + 1);
    std::vector<const float*> key_rows(step + 1), value_rows(step + 1);
    for (int64_t index = first; index < last; ++index) {
      const int64_t row = index / heads, h = index % heads, b = row / beam, own = row % beam;
      const int64_t* history = slot_p + (b * beam + own) * table_steps;
      for (int64_t t = 0; t <= step; ++t) {
        key_rows[t] = keys_p + at_cache(b, h, t, history[t]);
        value_rows[t] = values_p + at_cache(b, h, t, history[t]);
      }
      attend(qp + row * q_row + h * dim, key_rows.data(), value_rows.data(), nullptr, step + 1, dim, scores.data(),
             out_p + index * dim);
    }
  });
  return out;
}

namespace {

// What the int8 cache steps check of their inputs: q, k and v float32 [B * beam, H, D], the keys and values caches
// contiguous int8 CPU tensors [B, H, T, beam, D] of one shape, the table int64 [B, beam, T], step inside the cache.
void check_int8_cache_step(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                           const torch::Tensor& keys, const torch::Tensor& values, const torch::Tensor& table,
                           int64_t step) {
  check_float_cpu(q, "q", 3);
  check_float_cpu(k, "k", 3);
  check_float_cpu(v, "v", 3);
  for (const auto* cache : {&keys, &values})
    TORCH_CHECK(cache->device().is_cpu() && cache->scalar_type() == torch::kInt8 && cache->dim() == 5 &&
                    cache->is_contiguous() && cache->sizes() == keys.sizes(),
                "the int8 caches must be contiguous int8 CPU tensors [B, H, T, beam, D] of one shape");
  TORCH_CHECK(table.scalar_type() == torch::kInt64 && table.dim() == 3, "table must be int64 [B, beam, T]");
  const int64_t rows = keys.size(0) * keys.size(3);
  TORCH_CHECK(q.size(0) == rows && q.size(1) == keys.size(1) && q.size(2) == keys.size(4),
              "q must be [B * beam, H, D]");
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(), "q, k and v must all be [B * beam, H, D]");
  TORCH_CHECK(step >= 0 && step < keys.size(2), "step ", step, " outside the cache's ", keys.size(2), " steps");
}

}  // namespace

// cache_attention_step over the int8 cache ([B, H, T, beam, D] int8, scales [B, H, T, beam] float32): each (row,
// head)'s key and value written as q = clamp(nearbyint(x * 127 / absmax), -127, 127), scale absmax / 127 (0 for
// an all-zero vector: beam_cache.quantize_int8's formula, so both give the same levels), and read as levels times
// scales inside the attention, without a float32 copy of the cache.
torch::Tensor int8_cache_attention_step(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                        const torch::Tensor& keys, const torch::Tensor& values,
                                        const torch::Tensor& key_scale, const torch::Tensor& value_scale,
                                        const torch::Tensor& table, int64_t step,
                                        const std::optional<torch::Tensor>& given_out) {
  check_int8_cache_step(q, k, v, keys, values, table, step);
  for (const auto* scale : {&key_scale, &value_scale})
    TORCH_CHECK(scale->scalar_type() == torch::kFloat32 && scale->is_contiguous() &&
                    scale->sizes() == keys.sizes().slice(0, 4),
                "the int8 caches' scales must be contiguous float32 [B, H, T, beam]");
  const int64_t batch = keys.size(0), heads = keys.size(1), max_steps = keys.size(2), beam = keys.size(3),
                dim = keys.size(4), rows = batch * beam;
  const auto [query, q_row] = rows_of_heads(q);
  const auto [key, k_row] = rows_of_heads(k);
  const auto [value, v_row] = rows_of_heads(v);
  auto slots = table.contiguous();
  auto out = output_of(given_out, {rows, heads, dim}, "int8_cache_attention_step");
  const float *qp = query.data_ptr<float>(), *kp = key.data_ptr<float>(), *vp = value.data_ptr<float>();
  int8_t *keys_p = keys.data_ptr<int8_t>(), *values_p = values.data_ptr<int8_t>();
  float *key_scale_p = key_scale.data_ptr<float>(), *value_scale_p = value_scale.data_ptr<float>();
  float* out_p = out.data_ptr<float>();
  const int64_t* slot_p = slots.data_ptr<int64_t>();
  const int64_t table_steps = slots.size(2);
  auto at_scale = [=](int64_t b, int64_t h, int64_t t, int64_t slot) {
    return ((b * heads + h) * max_steps + t) * beam + slot;
  };
  at::parallel_for(0, rows * heads, parallel_grain(2 * dim), [&](int64_t first, int64_t last) {
    for (int64_t index = first; index < last; ++index) {
      const int64_t row = index / heads, h = index % heads, b = row / beam, slot = row % beam;
      const int64_t at = at_scale(b, h, step, slot);
      const std::pair<const float*, std::pair<int8_t*, float*>> writes[2] = {
          {kp + row * k_row + h * dim, {keys_p + at * dim, key_scale_p + at}},
          {vp + row * v_row + h * dim, {values_p + at * dim, value_scale_p + at}}};
      for (const auto& [in, target] : writes) {
        float absmax = 0.f;
        for (int64_t i = 0; i < dim; ++i) absmax = std::max(absmax, std::fabs(in[i]));
        const float inverse = absmax > 0.f ? 127.0f / absmax : 0.f;
        for (int64_t i = 0; i < dim; ++i)
          target.first[i] = static_cast<int8_t>(round_clamped(in[i] * inverse, -127.f, 127.f));
        *target.second = absmax / 127.0f;
      }
    }
  });
  at::parallel_for(0, rows * heads, parallel_grain(2 * (step + 1) * dim), [&](int64_t first, int64_t last) {
    std::vector<float> scores(step + 1), key_scales(step + 1), value_scales(step + 1);
    std::vector<const int8_t*> key_rows(step + 1), value_rows(step + 1);
    for (int64_t index = first; index < last; ++index) {
      const int64_t row = index / heads, h = index % heads, b = row / beam, own = row % beam;
      const int64_t* history = slot_p + (b * beam + own) * table_steps;
      for (int64_t t = 0; t <= step; ++t) {
        const int64_t at = at_scale(b, h, t, history[t]);
        key_rows[t] = keys_p + at * dim;
        value_rows[t] = values_p + at * dim;
        key_scales[t] = key_scale_p[at];
        value_scales[t] = value_scale_p[at];
      }
      attend_int8(qp + row * q_row + h * dim, key_rows.data(), key_scales.data(), value_rows.data(),
                  value_scales.data(), step + 1, dim, scores.data(), out_p + index * dim);
    }
  });
  return out;
}

// The int8 attention path's self-attention step (the int8 projection's float32 outputs q, k, v [B * beam, H, D]):
// each output rounded to its calibrated level, clamp(nearbyint(x * factor), -128, 127) with factor = 127 / absmax
// per channel (level_factors [3, H, D] for q, k, v: Int8Linear.forward_levels' formula), k and v levels written
// into the int8 caches ([B, H, T, beam, D], no scales), the attention read from the levels: the query's levels
// times its and the key's level steps (level_steps [3, H, D], absmax / 127), the output times the value's.
torch::Tensor level_cache_attention_step(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                         const torch::Tensor& keys, const torch::Tensor& values,
                                         const torch::Tensor& level_factors, const torch::Tensor& level_steps,
                                         const torch::Tensor& table, int64_t step,
                                         const std::optional<torch::Tensor>& given_out) {
  check_int8_cache_step(q, k, v, keys, values, table, step);
  const int64_t batch = keys.size(0), heads = keys.size(1), max_steps = keys.size(2), beam = keys.size(3),
                dim = keys.size(4), rows = batch * beam;
  for (const auto* levels : {&level_factors, &level_steps})
    TORCH_CHECK(levels->scalar_type() == torch::kFloat32 && levels->dim() == 3 && levels->size(0) == 3 &&
                    levels->size(1) == heads && levels->size(2) == dim,
                "level factors and steps must be float32 [3, H, D]");
  const auto [query, q_row] = rows_of_heads(q);
  const auto [key, k_row] = rows_of_heads(k);
  const auto [value, v_row] = rows_of_heads(v);
  const auto factors = level_factors.contiguous(), steps = level_steps.contiguous(), slots = table.contiguous();
  auto out = output_of(given_out, {rows, heads, dim}, "level_cache_attention_step");
  const float *qp = query.data_ptr<float>(), *kp = key.data_ptr<float>(), *vp = value.data_ptr<float>();
  const float *factor_p = factors.data_ptr<float>(), *step_p = steps.data_ptr<float>();
  int8_t *keys_p = keys.data_ptr<int8_t>(), *values_p = values.data_ptr<int8_t>();
  float* out_p = out.data_ptr<float>();
  const int64_t* slot_p = slots.data_ptr<int64_t>();
  const int64_t table_steps = slots.size(2), part = heads * dim;
  auto at_cache = [=](int64_t b, int64_t h, int64_t t, int64_t slot) {
    return (((b * heads + h) * max_steps + t) * beam + slot) * dim;
  };
  at::parallel_for(0, rows * heads, parallel_grain(2 * dim), [&](int64_t first, int64_t last) {
    for (int64_t index = first; index < last; ++index) {
      const int64_t row = index / heads, h = index % heads, at = at_cache(row / beam, h, step, row % beam);
      write_levels(kp + row * k_row + h * dim, factor_p + part + h * dim, keys_p + at, dim);
      write_levels(vp + row * v_row + h * dim, factor_p + 2 * part + h * dim, values_p + at, dim);
    }
  });
  at::parallel_for(0, rows * heads, parallel_grain(2 * (step + 1) * dim), [&](int64_t first, int64_t last) {
    std::vector<float> scores(step + 1), unit_scales(step + 1, 1.f), query_steps(dim);
    std::vector<int8_t> query_levels(dim);
    std::vector<const int8_t*> key_rows(step + 1), value_rows(step + 1);
    for (int64_t index = first; index < last; ++index) {
      const int64_t row = index / heads, h = index % heads, b = row / beam;
      const int64_t* history = slot_p + row * table_steps;
      const float *q_step = step_p + h * dim, *k_step = step_p + part + h * dim, *v_step = step_p + 2 * part + h * dim;
      write_levels(qp + row * q_row + h * dim, factor_p + h * dim, query_levels.data(), dim);
      for (int64_t i = 0; i < dim; ++i) query_steps[i] = static_cast<float>(query_levels[i]) * q_step[i] * k_step[i];
      for (int64_t t = 0; t <= step; ++t) {
        key_rows[t] = keys_p + at_cache(b, h, t, history[t]);
        value_rows[t] = values_p + at_cache(b, h, t, history[t]);
      }
      float* o = out_p + index * dim;
      attend_int8(query_steps.data(), key_rows.data(), unit_scales.data(), value_rows.data(), unit_scales.data(),
                  step + 1, dim, scores.data(), o);
      for (int64_t i = 0; i < dim; ++i) o[i] *= v_step[i];
    }
  });
  return out;
}

// The attention ([B * beam, H, D]) of the (pre-scaled) queries over their sentence's encoder keys and values
// ([B, H, S, D]), padded positions (padding [B, S], bool, or an empty tensor) left out.
torch::Tensor memory_attention(const torch::Tensor& q, const torch::Tensor& keys, const torch::Tensor& values,
                               const torch::Tensor& padding, int64_t beam,
                               const std::optional<torch::Tensor>& given_out) {
  check_float_cpu(q, "q", 3);
  check_float_cpu(keys, "keys", 4);
  check_float_cpu(values, "values", 4);
  const int64_t batch = keys.size(0), heads = keys.size(1), source = keys.size(2), dim = keys.size(3);
  TORCH_CHECK(q.size(0) == batch * beam && q.size(1) == heads && q.size(2) == dim, "q must be [B * beam, H, D]");
  const bool masked = padding.numel() > 0;
  TORCH_CHECK(!masked || (padding.scalar_type() == torch::kBool && padding.size(0) == batch &&
                          padding.size(1) == source), "padding must be bool [B, S] or empty");
  auto query = q.contiguous(), key = keys.contiguous(), value = values.contiguous();
  auto pad = masked ? padding.contiguous() : padding;
  auto out = output_of(given_out, query.sizes(), "memory_attention");
  const float *qp = query.data_ptr<float>(), *kp = key.data_ptr<float>(), *vp = value.data_ptr<float>();
  const bool* pad_p = masked ? pad.data_ptr<bool>() : nullptr;
  float* out_p = out.data_ptr<float>();
  // tasks in (sentence, head, beam) order: a sentence's beams read the same keys and values one after another,
  // while they are in L1 (each (row, head) computes what it computed in any order)
  at::parallel_for(0, batch * heads * beam, parallel_grain(2 * source * dim), [&](int64_t first, int64_t last) {
    std::vector<float> scores(source);
    std::vector<const float*> key_rows(source), value_rows(source);
    int64_t gathered = -1;  // the (sentence, head) whose rows key_rows / value_rows hold
    for (int64_t task = first; task < last; ++task) {
      const int64_t sentence_head = task / beam, b = sentence_head / heads, h = sentence_head % heads;
      const int64_t index = (b * beam + task % beam) * heads + h;  // (row, head) of q and out
      if (sentence_head != gathered) {
        const float* head_keys = kp + sentence_head * source * dim;
        const float* head_values = vp + sentence_head * source * dim;
        for (int64_t s = 0; s < source; ++s) {
          key_rows[s] = head_keys + s * dim;
          value_rows[s] = head_values + s * dim;
        }
        gathered = sentence_head;
      }
      attend(qp + index * dim, key_rows.data(), value_rows.data(), pad_p == nullptr ? nullptr : pad_p + b * source,
             source, dim, scores.data(), out_p + index * dim);
    }
  });
  return out;
}

// Writes the step's inputs x ([B * beam, C]) into each hypothesis' slot of the window buffer ([B, W - 1 + T,
// beam, C], contiguous; its first W - 1 times are the zero history) and returns, per hypothesis and channel,
// sum_j weight[j, c] * (its input at step - W + 1 + j), the slots named by table [B, beam, T]; weight is [W, C]
// (a lightweight convolution, an FSMN) or each hypothesis' own [H, W] (a dynamic convolution: channel c takes
// head c / (C / H)'s taps).
torch::Tensor window_convolution_step(const torch::Tensor& x, const torch::Tensor& inputs, const torch::Tensor& table,
                                      int64_t step, const torch::Tensor& weight) {
  check_float_cpu(x, "x", 2);
  check_float_cpu(inputs, "inputs", 4);
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == torch::kFloat32 &&
                  (weight.dim() == 2 || weight.dim() == 3),
              "weight must be a float32 CPU tensor, [W, C] or [B * beam, H, W]");
  TORCH_CHECK(inputs.is_contiguous(), "the window buffer must be contiguous");
  TORCH_CHECK(table.scalar_type() == torch::kInt64 && table.dim() == 3, "table must be int64 [B, beam, T]");
  const bool per_row = weight.dim() == 3;  // a dynamic convolution: each hypothesis' own taps, one set per head
  const int64_t batch = inputs.size(0), times = inputs.size(1), beam = inputs.size(2), channels = inputs.size(3),
                width = weight.size(per_row ? 2 : 0), heads = per_row ? weight.size(1) : 1, rows = batch * beam;
  TORCH_CHECK(x.size(0) == rows && x.size(1) == channels, "x must be [B * beam, C]");
  TORCH_CHECK(per_row ? weight.size(0) == rows && channels % heads == 0 : weight.size(1) == channels,
              "weight must be [W, C] or [B * beam, H, W] with H dividing C");
  TORCH_CHECK(step >= 0 && width - 1 + step < times, "step ", step, " outside the window buffer");
  auto input = x.contiguous(), taps = weight.contiguous(), slots = table.contiguous();
  auto out = torch::empty_like(input);
  const float *xp = input.data_ptr<float>(), *wp = taps.data_ptr<float>();
  float *buffer = inputs.data_ptr<float>(), *out_p = out.data_ptr<float>();
  const int64_t* slot_p = slots.data_ptr<int64_t>();
  const int64_t table_steps = slots.size(2), head_channels = channels / heads;
  at::parallel_for(0, rows, parallel_grain(channels), [&](int64_t first, int64_t last) {
    for (int64_t row = first; row < last; ++row) {
      const int64_t b = row / beam, own = row % beam;
      std::copy(xp + row * channels, xp + (row + 1) * channels,
                buffer + ((b * times + width - 1 + step) * beam + own) * channels);
    }
  });
  at::parallel_for(0, rows, parallel_grain(width * channels), [&](int64_t first, int64_t last) {
    for (int64_t row = first; row < last; ++row) {
      const int64_t b = row / beam, own = row % beam;
      float* o = out_p + row * channels;
      std::fill(o, o + channels, 0.f);
      for (int64_t j = 0; j < width; ++j) {
        const int64_t t = step - width + 1 + j;  // the step this tap reads; before 0: the zero history
        const int64_t slot = t < 0 ? 0 : slot_p[(b * beam + own) * table_steps + t];
        const float* in = buffer + ((b * times + width - 1 + t) * beam + slot) * channels;
        if (!per_row) {
          const float* tap = wp + j * channels;
          for (int64_t c = 0; c < channels; ++c) o[c] += in[c] * tap[c];
          continue;
        }
        for (int64_t h = 0; h < heads; ++h) {
          const float tap = wp[(row * heads + h) * width + j];
          for (int64_t c = h * head_channels; c < (h + 1) * head_channels; ++c) o[c] += in[c] * tap;
        }
      }
    }
  });
  return out;
}

torch::Tensor StepBuffers::take(at::IntArrayRef sizes) {
  if (next_ == buffers_.size()) buffers_.emplace_back();
  torch::Tensor& buffer = buffers_[next_++];
  if (!buffer.defined() || buffer.sizes() != sizes) buffer = torch::empty(sizes, torch::kFloat32);
  return buffer;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.def("window_convolution_step", &window_convolution_step, kNoGil,
        "write a step's inputs into the window buffer and convolve each hypothesis' last inputs (CPU)");
  m.def("cache_attention_step", &cache_attention_step, kNoGil,
        "write a step's keys/values into the beam caches and attend over each hypothesis' history (CPU)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("keys"), py::arg("values"), py::arg("table"), py::arg("step"),
        py::arg("out") = py::none());
  m.def("int8_cache_attention_step", &int8_cache_attention_step, kNoGil,
        "cache_attention_step over the int8 caches with per-(head, token) scales (CPU)", py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("keys"), py::arg("values"), py::arg("key_scale"), py::arg("value_scale"),
        py::arg("table"), py::arg("step"), py::arg("out") = py::none());
  m.def("level_cache_attention_step", &level_cache_attention_step, kNoGil,
        "the int8 attention path's step: projection outputs rounded to calibrated levels, int8 caches (CPU)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("keys"), py::arg("values"), py::arg("level_factors"),
        py::arg("level_steps"), py::arg("table"), py::arg("step"), py::arg("out") = py::none());
  m.def("memory_attention", &memory_attention, kNoGil,
        "attention of the beams' queries over their encoder memory (CPU)", py::arg("q"), py::arg("keys"),
        py::arg("values"), py::arg("padding"), py::arg("beam"), py::arg("out") = py::none());
  m.def("log_softmax_topk", &log_softmax_topk, kNoGil,
        "log-softmax, fairseq's token rules, row bias and top-k of every row in one pass (CPU)");
  m.def("merge_candidates", &merge_candidates, kNoGil, "each sentence's best candidates over its rows' best k (CPU)");
  m.def("advance_beams", &advance_beams, kNoGil,
        "fairseq's beam advance over the candidates, histories updated in place (CPU)");
  m.def("advance_table", &advance_table, kNoGil, "the beam indirection table after a step's parents, in place (CPU)");
  m.def("compact_sentences", &compact_sentences, kNoGil,
        "move the kept sentences' rows to the buffer's front in place (CPU)");
  register_int8_gemm(m);
  register_decoder_step(m);
  register_beam_search_loop(m);
  register_encoder(m);
}
