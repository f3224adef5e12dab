// fairseq's beam search over the native decoder step, step after step in one call (the fast generator's
// _BeamSearch runs it where the C++ step and the C++ candidate kernels are in use and no rule needs every row:
// no prefix tokens, n-gram blocking or temperature).
//
// Around the C++ step, the Python search loop cost ~0.17 ms per step at batch 1 (five calls into the kernels,
// a dozen small torch ops and a dict per finished hypothesis): ~40 % of a batch-1 int8 decode of the mini NMT
// transformer (cProfile, 2026-12-01). Here each step runs the same kernels in the same order (the decoder step,
// log_softmax_topk, merge_candidates, advance_beams, advance_table), and finished hypotheses are kept here until
// the batch ends, so a call decodes without Python and without the GIL until sentences finish; the caller then
// drops them from its buffers and caches (beam_cache.py, which reallocates them) and calls again. The search's
// state stays in the caller's tensors (token and score histories, cands_to_ignore, the table), as the Python
// search keeps it, so both give the same hypotheses and scores.
#include "step_kernels.h"

#include <algorithm>
#include <cmath>
#include <memory>
#include <utility>

namespace {

using torch::Tensor;

struct Hypothesis {
  std::vector<int64_t> tokens;  // the output after BOS, EOS last
  float score;                  // length-normalised where the search normalises
  std::vector<float> positional_scores;
};

// fairseq's SequenceGenerator settings the loop applies (fast_generator.FastSequenceGenerator takes them from it).
struct SearchRules {
  int64_t beam, pad, unk, eos;
  double unk_penalty;
  int64_t min_len, max_len;
  bool normalize_scores;
  double len_penalty;
};

class BeamSearchLoop {
 public:
  BeamSearchLoop(std::shared_ptr<NativeDecoderStep> decoder, int64_t sentences, SearchRules rules)
      : decoder_(std::move(decoder)), rules_(rules), finalized_(sentences) {
    TORCH_CHECK(decoder_ != nullptr, "the beam search loop needs a decoder step");
    TORCH_CHECK(rules_.beam >= 1 && rules_.max_len >= 0, "beam ", rules_.beam, " and max_len ", rules_.max_len,
                " must be at least 1 and 0");
  }

  // Decodes steps `step`, `step` + 1, ... of the active sentences (sentence_ids: their positions in the batch the
  // loop was made for) until some finish: returns (steps decoded so far, the active positions of the sentences
  // that finished at the last step, whether the batch is done). Unless done, the last step's beams are advanced
  // for every active sentence, finished ones included (rows the caller drops).
  std::tuple<int64_t, std::vector<int64_t>, bool> run(Tensor tokens, Tensor scores, Tensor cands_to_ignore,
                                                       const std::vector<int64_t>& sentence_ids,
                                                       const std::vector<Tensor>& caches, Tensor table, int64_t step,
                                                       const std::optional<Tensor>& positions) {
    const int64_t batch = cands_to_ignore.size(0), beam = rules_.beam;
    TORCH_CHECK(cands_to_ignore.dim() == 2 && cands_to_ignore.size(1) == beam && tokens.dim() == 2 &&
                    tokens.size(0) == batch * beam,
                "tokens must be [B * beam, L] and cands_to_ignore [B, beam] for a beam of ", beam);
    TORCH_CHECK(static_cast<int64_t>(sentence_ids.size()) == batch, "one sentence id per active sentence: ",
                sentence_ids.size(), " for ", batch);
    for (const int64_t id : sentence_ids)
      TORCH_CHECK(id >= 0 && id < static_cast<int64_t>(finalized_.size()), "sentence id ", id, " outside the batch of ",
                  finalized_.size());
    TORCH_CHECK(step >= 0 && step <= rules_.max_len, "step ", step, " outside 0..", rules_.max_len);
    // no autograd here: below the Autograd and ADInplaceOrView keys every op goes straight to its CPU kernel, without
    // view metadata, version counters or a second dispatch (~5 % of a batch-1 int8 decode of short sentences, in
    // turn with and without, 2026-12-01); the arithmetic is the same
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (;; ++step) {
      // at the first step every beam of a sentence is the same hypothesis: only the first ones are projected
      std::optional<Tensor> output_rows;
      if (step == 0 && beam > 1) output_rows = at::arange(batch, tokens.options()) * beam;
      buffers_.rewind();  // the last step's logits and intermediate results are no longer read
      const Tensor logits =
          decoder_->forward(tokens.select(1, step), caches, table, step, positions, output_rows, &buffers_);
      const int64_t k = std::min(2 * beam, logits.size(1) - 1);
      const Tensor row_bias = step > 0 ? scores.select(1, step - 1).contiguous() : at::zeros({logits.size(0)},
                                                                                               scores.options());
      const int64_t eos_mode = step >= rules_.max_len ? 2 : step < rules_.min_len ? 1 : 0;
      const auto row_best = log_softmax_topk(logits, row_bias, k, rules_.pad, rules_.unk, rules_.eos,
                                             rules_.unk_penalty, eos_mode);
      const auto [cand_scores, cand_tokens, cand_beams, eos_mask, ending] =
          merge_candidates(std::get<0>(row_best), std::get<1>(row_best), cands_to_ignore, rules_.eos);
      std::vector<int64_t> finished;
      if (ending) finished = finalize(step, cand_beams, cand_scores, eos_mask, tokens, scores, sentence_ids);
      if (static_cast<int64_t>(finished.size()) == batch || step >= rules_.max_len) return {step + 1, finished, true};
      const Tensor parents = advance_beams(cand_scores, cand_tokens, cand_beams, eos_mask, cands_to_ignore, tokens,
                                           scores, step);
      advance_table(table, parents, step + 1);
      if (!finished.empty()) return {step + 1, finished, false};
    }
  }

  // Each sentence's finished hypotheses as (tokens int64, score float32 0-dim, positional scores float32), in the
  // order they finished.
  std::vector<std::vector<std::tuple<Tensor, Tensor, Tensor>>> hypotheses() const {
    std::vector<std::vector<std::tuple<Tensor, Tensor, Tensor>>> out(finalized_.size());
    for (size_t s = 0; s < finalized_.size(); ++s) {
      for (const Hypothesis& h : finalized_[s]) {
        const auto length = static_cast<int64_t>(h.tokens.size());
        auto tokens = torch::empty({length}, torch::kInt64);
        auto positional = torch::empty({length}, torch::kFloat32);
        std::copy(h.tokens.begin(), h.tokens.end(), tokens.data_ptr<int64_t>());
        std::copy(h.positional_scores.begin(), h.positional_scores.end(), positional.data_ptr<float>());
        out[s].emplace_back(tokens, torch::scalar_tensor(h.score, torch::kFloat32), positional);
      }
    }
    return out;
  }

 private:
  // fairseq's finalisation (the generator's _finalize): the hypotheses ending with EOS among each sentence's
  // first `beam` candidates are stored (up to `beam` per sentence); returns the active positions of the sentences
  // that now have `beam` of them (every one that ended a hypothesis, at the last step).
  std::vector<int64_t> finalize(int64_t step, const Tensor& cand_beams, const Tensor& cand_scores,
                                const Tensor& eos_mask, const Tensor& tokens, const Tensor& scores,
                                const std::vector<int64_t>& sentence_ids) {
    const int64_t batch = eos_mask.size(0), k = eos_mask.size(1), beam = rules_.beam;
    const bool* ends = eos_mask.data_ptr<bool>();
    const int64_t* parent = cand_beams.data_ptr<int64_t>();
    const float* cand = cand_scores.data_ptr<float>();
    const int64_t* history = tokens.data_ptr<int64_t>();
    const float* history_scores = scores.data_ptr<float>();
    const int64_t token_width = tokens.size(1), score_width = scores.size(1);
    // the torch path divides the float32 scores by this Python float (as float32)
    const auto length_norm = static_cast<float>(std::pow(static_cast<double>(step + 1), rules_.len_penalty));
    std::vector<int64_t> finished;
    for (int64_t b = 0; b < batch; ++b) {
      auto& stored = finalized_[sentence_ids[b]];
      bool ended = false;
      for (int64_t j = 0; j < beam; ++j) {
        if (!ends[b * k + j]) continue;
        ended = true;
        if (static_cast<int64_t>(stored.size()) >= beam) continue;
        const int64_t row = b * beam + parent[b * k + j];
        const float eos_score = cand[b * k + j];
        Hypothesis h;
        h.tokens.assign(history + row * token_width + 1, history + row * token_width + step + 2);
        h.tokens[step] = rules_.eos;
        h.positional_scores.assign(history_scores + row * score_width, history_scores + row * score_width + step + 1);
        h.positional_scores[step] = eos_score;
        for (int64_t t = step; t > 0; --t) h.positional_scores[t] -= h.positional_scores[t - 1];  // per-token
        h.score = rules_.normalize_scores ? eos_score / length_norm : eos_score;
        stored.push_back(std::move(h));
      }
      if (ended && (static_cast<int64_t>(stored.size()) == beam || step == rules_.max_len)) finished.push_back(b);
    }
    return finished;
  }

  std::shared_ptr<NativeDecoderStep> decoder_;
  SearchRules rules_;
  std::vector<std::vector<Hypothesis>> finalized_;  // by sentence of the batch
  StepBuffers buffers_;  // the decoder step's outputs, reused from step to step
};

}  // namespace

void register_beam_search_loop(pybind11::module_& m) {
  namespace py = pybind11;
  py::class_<BeamSearchLoop>(m, "BeamSearchLoop",
                             "fairseq's beam search over a native decoder step, many steps per call (CPU)")
      .def(py::init([](std::shared_ptr<NativeDecoderStep> decoder, int64_t sentences, int64_t beam, int64_t pad,
                       int64_t unk, int64_t eos, double unk_penalty, int64_t min_len, int64_t max_len,
                       bool normalize_scores, double len_penalty) {
             return BeamSearchLoop(std::move(decoder), sentences,
                                   {beam, pad, unk, eos, unk_penalty, min_len, max_len, normalize_scores, len_penalty});
           }),
           py::arg("decoder"), py::arg("sentences"), py::arg("beam"), py::arg("pad"), py::arg("unk"), py::arg("eos"),
           py::arg("unk_penalty"), py::arg("min_len"), py::arg("max_len"), py::arg("normalize_scores"),
           py::arg("len_penalty"))
      .def("run", &BeamSearchLoop::run, kNoGil, py::arg("tokens"), py::arg("scores"), py::arg("cands_to_ignore"),
           py::arg("sentence_ids"), py::arg("caches"), py::arg("table"), py::arg("step"), py::arg("positions"))
      .def("hypotheses", &BeamSearchLoop::hypotheses);
}
