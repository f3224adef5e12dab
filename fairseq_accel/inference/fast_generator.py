"""Beam search over a ``FastDecoder``: fairseq ``SequenceGenerator``'s search, without its copies.

The search is fairseq 0.12's (``SequenceGenerator._generate`` with ``search.BeamSearch``): the same
candidates (top ``2 * beam`` over ``beam x vocab``), the same finalisation of hypotheses ending in EOS,
length normalisation, min/max length, unknown-word penalty, n-gram blocking and prefix tokens, so that
it returns what stock returns. What differs is the model side: one decoder step per token over
preallocated caches reordered by index (``beam_cache``), cross-attention K/V once per sentence, and no
per-step reordering of the encoder output. The generator is built from a stock ``SequenceGenerator``
(``from_stock``) and takes every search setting from it. Where the decoder runs its C++ step with the C++
kernels, the search loop runs in C++ too (``cpu_kernels.beam_search_loop``: the same steps, no Python between
them), back here only when sentences finish.
"""
import contextlib
import gc
import math
import threading
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from fairseq.sequence_generator import SequenceGenerator
from torch import Tensor, nn

from fairseq_accel.inference import cpu_kernels
from fairseq_accel.inference.beam_cache import CacheBytes
from fairseq_accel.inference.fast_decoder import FastDecoder
from fairseq_accel.inference.native_encoder import build_native_encoder
from fairseq_accel.inference.sentence_parallel import SentenceParallel
from fairseq_accel.inference.thread_choice import ThreadChooser

Hypothesis = Dict[str, Tensor]


@contextlib.contextmanager
def cyclic_gc_paused():
    """Python's cycle collector paused while a batch decodes (and resumed as it was): the search makes many
    short-lived objects and no reference cycles, and the collector's passes over them took ~5 % of a batch-1
    decode (perf, transformer_mini, 2026-12-01). Cycles made meanwhile are collected after the batch."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@dataclass
class CacheStats:
    """Decoder cache bytes of every decoded sentence (each for its own length), summed, and how many
    sentences that covers: what ``fairseq-accel-benchmark`` reports per sentence."""

    sentences: int = 0
    total: CacheBytes = field(default_factory=CacheBytes)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # shards record from their threads

    def record(self, sentences: int, per_sentence: CacheBytes) -> None:
        with self.lock:
            self.sentences += sentences
            self.total = self.total + per_sentence * sentences

    def per_sentence(self) -> Optional[CacheBytes]:
        """Mean bytes per decoded sentence, or None before any sentence was decoded."""
        return self.total * (1 / self.sentences) if self.sentences else None


class FastSequenceGenerator(nn.Module):
    """Drop-in for ``SequenceGenerator`` in ``fairseq-generate`` (``task.inference_step`` calls
    ``generate``); one model, beam search."""

    def __init__(self, stock: SequenceGenerator, model: nn.Module, decoder: FastDecoder, kernels=None,
                 threads: Optional[ThreadChooser] = None, parallel_sentences: bool = True):
        """``kernels``: the module of the fused log-softmax + top-k kernel (the CUDA kernels the decoder was
        built with, or the C++ CPU kernels), or None for the torch path; ``threads``: who sets the CPU thread
        count before each batch (None: torch's count as it is); ``parallel_sentences``: N > 1 CPU threads
        decode N shards of a batch, one thread each (``sentence_parallel``), not every operation on N threads."""
        super().__init__()
        self.model = model
        self.fast_decoder = decoder
        # an int8 transformer encoder in one C++ call (with the C++ kernels); otherwise the model's own
        self.native_encoder = build_native_encoder(model.encoder) if kernels is cpu_kernels else None
        self.sentence_parallel = SentenceParallel(decoder) if parallel_sentences else None
        self.kernels = kernels
        self.tgt_dict = stock.tgt_dict
        self.pad, self.unk, self.eos = stock.pad, stock.unk, stock.eos
        self.symbols_to_strip_from_output = stock.symbols_to_strip_from_output
        self.vocab_size = stock.vocab_size
        self.beam_size = stock.beam_size
        self.max_len_a, self.max_len_b = stock.max_len_a, stock.max_len_b
        self.min_len, self.max_len = stock.min_len, stock.max_len
        self.normalize_scores, self.len_penalty = stock.normalize_scores, stock.len_penalty
        self.unk_penalty, self.temperature = stock.unk_penalty, stock.temperature
        self.repeat_ngram_blocker = stock.repeat_ngram_blocker
        self.cache_stats = CacheStats()
        self.threads = threads
        self.model.eval()

    @torch.no_grad()  # not inference_mode: fairseq-generate edits the returned tensors in place
    def generate(self, models, sample: Dict[str, Dict[str, Tensor]], prefix_tokens: Optional[Tensor] = None, constraints=None, bos_token: Optional[int] = None, **unused) -> List[List[Hypothesis]]:
        if constraints is not None:
            raise ValueError("the fast generator does not support --constraints (use --accel-generator stock)")
        with cyclic_gc_paused():
            if sample["net_input"]["src_tokens"].device.type != "cpu":
                return _BeamSearch(self, self.fast_decoder, sample, prefix_tokens, bos_token).run()
            if self.threads is None:
                return self._decode_on_cpu(sample, prefix_tokens, bos_token)[0]
            return self.threads.run(lambda: self._decode_on_cpu(sample, prefix_tokens, bos_token))

    def _decode_on_cpu(self, sample, prefix_tokens: Optional[Tensor], bos_token: Optional[int]):
        """(hypotheses per sentence, rows decoded) at torch's thread count: by sentence shards where that is on."""
        source_width = sample["net_input"]["src_tokens"].size(1)  # the batch's: --max-len-a's limit depends on it

        def decode(decoder: FastDecoder, shard_sample, shard_prefix: Optional[Tensor]):
            search = _BeamSearch(self, decoder, shard_sample, shard_prefix, bos_token, source_width)
            return search.run(), search.rows_decoded

        shards = min(torch.get_num_threads(), sample["net_input"]["src_tokens"].size(0))
        if self.sentence_parallel is None or shards < 2:
            return decode(self.fast_decoder, sample, prefix_tokens)
        return self.sentence_parallel.decode(sample, prefix_tokens, shards, decode)


def _hypothesis(tokens: Tensor, score: Tensor, positional_scores: Tensor) -> Hypothesis:
    """A finished hypothesis as fairseq's SequenceGenerator returns it (no attention or alignment)."""
    return {"tokens": tokens, "score": score, "attention": torch.empty(0), "alignment": torch.empty(0),
            "positional_scores": positional_scores}


class _BeamSearch:
    """One batch of beam search; attributes hold the active sentences' buffers."""

    def __init__(self, gen: FastSequenceGenerator, decoder: FastDecoder, sample, prefix_tokens: Optional[Tensor],
                 bos_token: Optional[int], source_width: Optional[int] = None):
        """``source_width``: the padded source length the output length limit is taken from (default: the
        sample's; a shard of a batch gets the batch's)."""
        self.gen = gen
        self.decoder = decoder
        net_input = sample["net_input"]
        src_tokens = net_input["src_tokens"]
        self.bsz = src_tokens.size(0)
        src_len = source_width or src_tokens.size(1)
        self.beam = gen.beam_size
        self.max_len = min(int(gen.max_len_a * src_len + gen.max_len_b), gen.max_len - 1)
        if gen.min_len > self.max_len:
            raise ValueError(f"--min-len {gen.min_len} is larger than the maximum output length {self.max_len}")
        encoder_out = (gen.model.encoder.forward_torchscript(net_input) if gen.native_encoder is None
                       else gen.native_encoder(net_input))
        decoder.start(encoder_out, self.beam, self.max_len + 1)
        device = src_tokens.device
        rows = self.bsz * self.beam
        self.tokens = torch.full((rows, self.max_len + 2), gen.pad, dtype=torch.long, device=device)
        self.tokens[:, 0] = gen.eos if bos_token is None else bos_token
        self.scores = torch.zeros(rows, self.max_len + 1, device=device)
        self.prefix_tokens = prefix_tokens
        self.sentence_ids = list(range(self.bsz))  # original batch position of each active sentence
        self.cands_to_ignore = torch.zeros(self.bsz, self.beam, dtype=torch.bool, device=device)
        self.finalized: List[List[Hypothesis]] = [[] for _ in range(self.bsz)]
        self.cand_offsets = torch.arange(2 * self.beam, device=device)
        # the C++ candidate merge and beam advance: with the C++ candidate kernel, where no rule needs every row
        self.native_search = (gen.kernels is cpu_kernels and prefix_tokens is None and gen.repeat_ngram_blocker is None
                              and gen.temperature == 1.0)
        self.device = device
        self.rows_decoded = 0  # hypotheses times steps: the work --accel-threads auto compares

    def run(self) -> List[List[Hypothesis]]:
        if self.native_search and self.decoder.native_caches is not None:
            self._run_native_loop()
        else:
            self._run_steps()
        for hypotheses in self.finalized:
            hypotheses.sort(key=lambda h: float(h["score"]), reverse=True)
        return self.finalized

    def _run_native_loop(self) -> None:
        """The search in C++ (``cpu_kernels.beam_search_loop``) between the steps where sentences finish, which
        then leave this search's buffers and the decoder's caches here."""
        gen = self.gen
        loop = cpu_kernels.beam_search_loop(self.decoder.native_step, self.bsz, self.beam, gen.pad, gen.unk, gen.eos,
                                            gen.unk_penalty, gen.min_len, self.max_len, gen.normalize_scores,
                                            gen.len_penalty)
        step, done = 0, False
        while not done:
            reached, finished, done = self.decoder.run_native_search(loop, self.tokens, self.scores,
                                                                     self.cands_to_ignore, self.sentence_ids)
            self.rows_decoded += self.bsz * self.beam * (reached - step)
            step = reached
            if finished:
                gen.cache_stats.record(len(finished), self.decoder.state.bytes_per_sentence(reached))
            if finished and not done:
                self._keep_sentences(torch.tensor([i for i in range(self.bsz) if i not in finished]))
        for sentence, hypotheses in enumerate(loop.hypotheses()):
            self.finalized[sentence] = [_hypothesis(*hypothesis) for hypothesis in hypotheses]

    def _run_steps(self) -> None:
        """The search step by step from Python (over the C++ or the Python decoder step)."""
        remaining = self.bsz
        for step in range(self.max_len + 1):
            self.rows_decoded += self.bsz * self.beam
            logits = self.decoder.step(self.tokens[:, step], self._output_rows(step))
            if self.native_search:
                cand_scores, cand_indices, cand_beams, eos_mask, ending = cpu_kernels.merge_candidates(
                    *self._row_candidates(logits, step), self.cands_to_ignore, self.gen.eos)
            else:
                cand_scores, cand_indices, cand_beams = self._candidates(logits, step)
                eos_mask = cand_indices.eq(self.gen.eos) & cand_scores.ne(-math.inf)
                eos_mask[:, : self.beam] &= ~self.cands_to_ignore
                ending = bool(eos_mask[:, : self.beam].any())
            finished = self._finalize(step, cand_beams, cand_scores, eos_mask) if ending else []
            remaining -= len(finished)
            if remaining == 0 or step >= self.max_len:
                break
            if finished:
                keep = torch.tensor([i for i in range(self.bsz) if i not in finished], device=self.device)
                cand_scores, cand_indices, cand_beams, eos_mask = (
                    t.index_select(0, keep) for t in (cand_scores, cand_indices, cand_beams, eos_mask)
                )
                self._keep_sentences(keep)
            self._advance(step, cand_scores, cand_indices, cand_beams, eos_mask)

    def _output_rows(self, step: int) -> Optional[Tensor]:
        """At the first step every beam of a sentence is the same hypothesis and only the first one's
        scores are used: project just those rows to the vocabulary. (Not with prefix tokens or n-gram
        blocking, which work on every row even then.)"""
        if step > 0 or self.beam == 1 or self.prefix_tokens is not None or self.gen.repeat_ngram_blocker is not None:
            return None
        return torch.arange(self.bsz, device=self.device) * self.beam

    def _row_offsets(self) -> Tensor:
        return (torch.arange(self.bsz, device=self.device) * self.beam).unsqueeze(1)

    # --- finished hypotheses and sentences ------------------------------------------------------------

    def _finalize(self, step: int, cand_beams: Tensor, cand_scores: Tensor, eos_mask: Tensor) -> List[int]:
        """Store the hypotheses that end with EOS among each sentence's best ``beam`` candidates; return
        the (active-batch) positions of the sentences that are now finished."""
        gen, beam = self.gen, self.beam
        ending = eos_mask[:, :beam]
        rows = (cand_beams[:, :beam] + self._row_offsets())[ending]
        eos_scores = cand_scores[:, :beam][ending]
        tokens = self.tokens[rows, 1 : step + 2]
        tokens[:, step] = gen.eos
        positional = self.scores[rows, : step + 1]
        positional[:, step] = eos_scores
        positional[:, 1:] = positional[:, 1:] - positional[:, :-1]
        if gen.normalize_scores:
            eos_scores = eos_scores / (step + 1) ** gen.len_penalty
        sentences = torch.div(rows, beam, rounding_mode="trunc").tolist()
        # one view per hypothesis from a single unbind each (not an indexing op per hypothesis and tensor)
        for sentence, hyp_tokens, score, hyp_positional in zip(sentences, tokens.unbind(0), eos_scores.unbind(0),
                                                                positional.unbind(0)):
            hypotheses = self.finalized[self.sentence_ids[sentence]]
            if len(hypotheses) < beam:
                hypotheses.append(_hypothesis(hyp_tokens, score, hyp_positional))
        finished = [
            sentence for sentence in sorted(set(sentences))
            if len(self.finalized[self.sentence_ids[sentence]]) == beam or step == self.max_len
        ]
        if finished:
            self.gen.cache_stats.record(len(finished), self.decoder.state.bytes_per_sentence(step + 1))
        return finished

    def _keep_sentences(self, keep: Tensor) -> None:
        """Finished sentences leave the batch (and the decoder's caches)."""
        self.sentence_ids = [self.sentence_ids[i] for i in keep.tolist()]
        new_bsz = keep.numel()
        for name in ("tokens", "scores"):
            tensor = getattr(self, name)
            setattr(self, name, tensor.view(self.bsz, -1).index_select(0, keep).view(new_bsz * self.beam, -1))
        self.cands_to_ignore = self.cands_to_ignore.index_select(0, keep)
        if self.prefix_tokens is not None:
            self.prefix_tokens = self.prefix_tokens.index_select(0, keep)
        self.bsz = new_bsz
        self.decoder.keep(keep)

    def _advance(self, step: int, cand_scores: Tensor, cand_indices: Tensor, cand_beams: Tensor, eos_mask: Tensor) -> None:
        """Each sentence goes on with its best ``beam`` candidates that do not end with EOS."""
        if self.native_search:
            parents = cpu_kernels.advance_beams(cand_scores, cand_indices, cand_beams, eos_mask, self.cands_to_ignore,
                                                self.tokens, self.scores, step)
            self.decoder.advance(parents)
            return
        beam, cand_size = self.beam, 2 * self.beam
        eos_mask[:, :beam] |= self.cands_to_ignore
        rank = eos_mask.long() * cand_size + self.cand_offsets[: eos_mask.size(1)]
        ignored, active = rank.topk(beam, dim=1, largest=False)
        self.cands_to_ignore = ignored.ge(cand_size)[:, :beam]
        parents = cand_beams.gather(1, active)
        rows = (parents + self._row_offsets()).view(-1)
        self.tokens[:, : step + 1] = self.tokens[rows, : step + 1]
        self.tokens.view(self.bsz, beam, -1)[:, :, step + 1] = cand_indices.gather(1, active)
        if step > 0:
            self.scores[:, :step] = self.scores[rows, :step]
        self.scores.view(self.bsz, beam, -1)[:, :, step] = cand_scores.gather(1, active)
        self.decoder.advance(parents)

    # --- candidates ---------------------------------------------------------------------------------

    def _candidates(self, logits: Tensor, step: int):
        """Top ``2 * beam`` continuations of each sentence: (scores, token ids, source beam) ``[B, 2 * beam]``."""
        gen = self.gen
        if gen.temperature != 1.0:
            logits = logits / gen.temperature
        prefix_step = self.prefix_tokens is not None and step < self.prefix_tokens.size(1) and step < self.max_len
        if gen.kernels is not None and not prefix_step and gen.repeat_ngram_blocker is None:
            return self._fused_candidates(logits, step)
        lprobs = torch.log_softmax(logits, dim=-1)
        torch.nan_to_num(lprobs, nan=-math.inf, posinf=math.inf, neginf=-math.inf, out=lprobs)
        lprobs[:, gen.pad] = -math.inf
        if gen.unk_penalty:
            lprobs[:, gen.unk] -= gen.unk_penalty
        if step >= self.max_len:
            eos_lprobs = lprobs[:, gen.eos].clone()
            lprobs.fill_(-math.inf)
            lprobs[:, gen.eos] = eos_lprobs
        if prefix_step:
            lprobs = self._force_prefix(lprobs, step)
        elif step < gen.min_len:
            lprobs[:, gen.eos] = -math.inf
        if gen.repeat_ngram_blocker is not None:
            lprobs = gen.repeat_ngram_blocker(self.tokens, lprobs, self.bsz, self.beam, step)
        vocab = lprobs.size(-1)
        lprobs = lprobs.view(self.bsz, -1, vocab)
        if step == 0:
            lprobs = lprobs[:, :1]  # all beams are the same hypothesis at the first step
        else:
            lprobs = lprobs + self.scores.view(self.bsz, self.beam, -1)[:, :, step - 1 : step]
        flat = lprobs.reshape(self.bsz, -1)
        top_scores, top_index = flat.topk(min(2 * self.beam, flat.size(1) - 1))
        return top_scores, top_index % vocab, torch.div(top_index, vocab, rounding_mode="trunc")

    def _row_candidates(self, logits: Tensor, step: int):
        """Every row's best ``2 * beam`` continuations from the kernels' log-softmax + top-k: (scores, token ids)
        ``[rows, 2 * beam]``; a sentence's best over ``beam x vocab`` are among the union of its rows'."""
        gen = self.gen
        k = min(2 * self.beam, logits.size(1) - 1)
        row_bias = self.scores[:, step - 1] if step > 0 else torch.zeros(logits.size(0), device=logits.device)
        eos_mode = 2 if step >= self.max_len else 1 if step < gen.min_len else 0
        values, indices, _ = gen.kernels.log_softmax_topk(
            logits.float().contiguous(), row_bias.contiguous(), k, gen.pad, gen.unk, gen.eos, gen.unk_penalty, eos_mode
        )
        return values, indices.long()

    def _fused_candidates(self, logits: Tensor, step: int):
        """The same candidates from :meth:`_row_candidates`."""
        values, indices = self._row_candidates(logits, step)
        k = values.size(1)
        values, indices = values.view(self.bsz, -1, k), indices.view(self.bsz, -1, k)
        if step == 0:
            return values[:, 0], indices[:, 0], torch.zeros_like(indices[:, 0])
        top_scores, top_index = values.reshape(self.bsz, -1).topk(k)
        return top_scores, indices.reshape(self.bsz, -1).gather(1, top_index), torch.div(top_index, k, rounding_mode="trunc")

    def _force_prefix(self, lprobs: Tensor, step: int) -> Tensor:
        """Allow only the prefix token at this step (fairseq's ``_prefix_tokens``)."""
        beam = self.beam
        prefix = self.prefix_tokens[:, step].repeat_interleave(beam)
        prefix_lprobs = lprobs.gather(-1, prefix.unsqueeze(-1))
        forced = prefix.ne(self.gen.pad)
        lprobs[forced] = -math.inf
        lprobs[forced] = lprobs[forced].scatter(-1, prefix[forced].unsqueeze(-1), prefix_lprobs[forced])
        ends = prefix.eq(self.gen.eos)
        if ends.any():  # a prefix ending here: every beam continues the first one
            sentences = ends.view(-1, beam)[:, 0]
            for name in ("tokens", "scores"):
                tensor = getattr(self, name).view(-1, beam, getattr(self, name).size(-1))
                tensor[sentences] = tensor[sentences][:, :1]
            lprobs = lprobs.view(-1, beam, lprobs.size(-1))
            lprobs[sentences] = lprobs[sentences][:, :1]
            lprobs = lprobs.view(-1, lprobs.size(-1))
        return lprobs
