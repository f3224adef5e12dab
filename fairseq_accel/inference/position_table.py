"""The positional embeddings of an unpadded sequence's first positions, made once by the model's own module.

fairseq's positional modules (sinusoidal or learned) number a sequence's positions from ``padding_idx + 1``,
skipping padding, and look each one up: at batch 1 of the mini NMT transformer that took ~35 us of every
sentence's encoder call and, in the decoder, ~0.1 ms per batch. A sequence without padding always gets the
same rows, so they are made once, for the longest sequence asked for so far, and shared (a prefix of the table
is what the module gives a shorter sequence)."""
from typing import Optional

import torch
from torch import Tensor, nn


class PositionTable:
    """``first(n)``: the ``[n, C]`` positional embeddings ``module`` gives any unpadded sequence of ``n`` tokens."""

    def __init__(self, module: nn.Module, token: int):
        """``token``: any id that is not padding (the table is made from a sequence of it)."""
        self.module = module
        self.token = token
        self.table: Optional[Tensor] = None

    def first(self, n: int, device: torch.device) -> Tensor:
        table = self.table
        if table is None or table.size(0) < n or table.device != device:
            tokens = torch.full((1, n), self.token, dtype=torch.long, device=device)
            table = self.table = self.module(tokens)[0]
        return table[:n]
