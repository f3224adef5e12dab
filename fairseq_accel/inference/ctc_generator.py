"""``--accel-generator ctc_greedy``: transcribe with a speech model's CTC head alone (best path), no decoder.

A model trained with the ``joint_ctc_attention`` criterion carries a CTC head on its encoder
(:mod:`fairseq_accel.models.ctc_head`). Its best path is one encoder pass and an argmax per frame, so it
costs a fraction of attention beam search and, early in training, is far more accurate than the attention
decoder: the CTC alignment is monotonic and cannot loop or stop early (on the mini espeak corpus after 500
updates of s2t_sanm_mini with character units, test CER 40 % by CTC against 107 % by the attention decoder's
beam search). The hypotheses come back in ``SequenceGenerator``'s format, so ``fairseq-generate`` prints and
scores them as usual.
"""
from typing import Any, Dict, List, Optional

import torch
from fairseq.data import Dictionary
from torch import Tensor, nn

from fairseq_accel.models.ctc_head import CTCBestPath, ctc_best_paths, ctc_log_probs, find_ctc_head


class CTCGreedyGenerator(nn.Module):
    """Best-path CTC decoding of ``model`` (one hypothesis per sentence; the blank is ``tgt_dict.bos()``).

    A hypothesis's ``positional_scores`` hold, per token, the best log-probability among the frames it was read
    from (0 for the closing ``</s>``), and its ``score`` is their mean, so that ``fairseq-generate`` prints
    per-token scores on the same scale as the stock generator's.
    """

    def __init__(self, model: nn.Module, tgt_dict: Dictionary):
        super().__init__()
        self.model = model
        model.eval()
        self.ctc_head = find_ctc_head(model)
        self.blank = tgt_dict.bos()
        self.eos = tgt_dict.eos()
        self.symbols_to_strip_from_output = {self.eos}

    @torch.no_grad()
    def generate(
        self, models: List[nn.Module], sample: Dict[str, Any], prefix_tokens: Optional[Tensor] = None, **kwargs: Any
    ) -> List[List[Dict[str, Any]]]:
        """Hypotheses of ``sample`` in fairseq's format: one list (of one hypothesis) per sentence."""
        if prefix_tokens is not None:
            raise ValueError("--accel-generator ctc_greedy cannot force a prefix: drop --prefix-size")
        net_input = sample["net_input"]
        encoder_out = self.model.encoder(net_input["src_tokens"], src_lengths=net_input["src_lengths"])
        lprobs, lengths = ctc_log_probs(self.ctc_head, encoder_out)
        device = net_input["src_tokens"].device
        return [[self._hypothesis(path, device)] for path in ctc_best_paths(lprobs, lengths, self.blank)]

    def _hypothesis(self, path: CTCBestPath, device: torch.device) -> Dict[str, Any]:
        tokens = torch.tensor(path.tokens + [self.eos], dtype=torch.long, device=device)
        scores = torch.tensor(path.scores + [0.0], device=device)
        return {
            "tokens": tokens,
            "score": scores.mean(),
            "attention": None,
            "alignment": None,
            "positional_scores": scores,
        }
