"""Speech encoder front-ends that keep every utterance of a padded batch exactly as it is alone.

Both front-ends map ``(batch, frames, features)`` filterbanks and their lengths to a shorter sequence:

* :class:`Conv2dSubsampling` — two 3x3 convolutions with stride 2 (4x fewer frames), the ESPnet/FunASR
  ``Conv2dSubsampling`` layout. Padded frames are zeroed before each convolution, so no padding value
  (nor the first convolution's bias on padded frames) reaches a valid output frame. fairseq's
  ``Conv1dSubsampler`` does not do this and leaks padding into the last valid frames.
* :class:`LowFrameRate` — FunASR's low frame rate (LFR) stacking: ``m`` consecutive frames every ``n``
  frames (m=7, n=6 in FunASR's SAN-M template), the first frame repeated ``(m-1)//2`` times in front and the
  utterance's own last frame repeated at its end (not the batch's padding).
"""
import math
from typing import Tuple

import torch
from torch import Tensor, nn


def padding_mask(lengths: Tensor, max_length: int) -> Tensor:
    """(batch, max_length) bool mask, True at the frames beyond each utterance's length."""
    return torch.arange(max_length, device=lengths.device)[None, :] >= lengths[:, None]


def zero_padding(x: Tensor, lengths: Tensor) -> Tensor:
    """Zero the frames of ``x`` (batch, time, ...) at or beyond each utterance's length."""
    valid = ~padding_mask(lengths, x.size(1))
    return x * valid.view(*valid.shape, *([1] * (x.dim() - 2))).to(x.dtype)


def sinusoidal_positions(length: int, dim: int, device=None, dtype=torch.float32) -> Tensor:
    """(length, dim) sinusoids for positions 1..length: sines then cosines, timescales 1..1e4.

    The tensor2tensor formula that FunASR's ``SinusoidalPositionEncoder`` uses (its inputs are LFR frames).
    """
    half = dim // 2
    increment = math.log(10000.0) / max(half - 1, 1)
    inv_timescales = torch.exp(torch.arange(half, device=device, dtype=torch.float32) * -increment)
    positions = torch.arange(1, length + 1, device=device, dtype=torch.float32)
    scaled = positions[:, None] * inv_timescales[None, :]
    encoding = torch.cat([torch.sin(scaled), torch.cos(scaled)], dim=1)
    if dim % 2:
        encoding = torch.nn.functional.pad(encoding, (0, 1))
    return encoding.to(dtype)


class Conv2dSubsampling(nn.Module):
    """Two masked 3x3/stride-2 convolutions + ReLU, then a linear map to ``out_dim`` (4x subsampling)."""

    def __init__(self, in_features: int, out_dim: int, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, kernel_size=3, stride=2)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, stride=2)
        self.out = nn.Linear(channels * self.output_length(torch.tensor(in_features)).item(), out_dim)
        self.out_dim = out_dim

    @staticmethod
    def conv_length(lengths: Tensor) -> Tensor:
        """Frames left after one unpadded 3-wide stride-2 convolution."""
        return torch.div(lengths - 3, 2, rounding_mode="floor") + 1

    @classmethod
    def output_length(cls, lengths: Tensor) -> Tensor:
        """Frames left after both convolutions."""
        return cls.conv_length(cls.conv_length(lengths))

    def forward(self, features: Tensor, lengths: Tensor) -> Tuple[Tensor, Tensor]:
        first = self.conv_length(lengths)
        x = zero_padding(features, lengths).unsqueeze(1)  # batch x 1 x time x features
        x = torch.relu(self.conv1(x))
        x = zero_padding(x.transpose(1, 2), first).transpose(1, 2)  # mask between the convolutions
        x = torch.relu(self.conv2(x))
        batch, channels, time, freq = x.shape
        x = self.out(x.transpose(1, 2).reshape(batch, time, channels * freq))
        return x, self.output_length(lengths)


class LowFrameRate(nn.Module):
    """Stack ``m`` frames every ``n`` frames (FunASR LFR): output dim = m x input dim, ceil(T/n) frames."""

    def __init__(self, in_features: int, m: int = 7, n: int = 6):
        super().__init__()
        if m < 1 or n < 1:
            raise ValueError(f"LFR needs m >= 1 and n >= 1, got m={m}, n={n}")
        self.m, self.n = m, n
        self.out_dim = in_features * m

    def output_length(self, lengths: Tensor) -> Tensor:
        return torch.div(lengths + self.n - 1, self.n, rounding_mode="floor")

    def forward(self, features: Tensor, lengths: Tensor) -> Tuple[Tensor, Tensor]:
        batch, time, dim = features.shape
        out_lengths = self.output_length(lengths)
        steps = int(out_lengths.max()) if batch else 0
        # frame j of output step i is input frame i*n + j - (m-1)//2, clamped into the utterance
        offsets = torch.arange(steps, device=features.device)[:, None] * self.n
        taps = torch.arange(self.m, device=features.device)[None, :] - (self.m - 1) // 2
        index = (offsets + taps)[None].expand(batch, -1, -1)
        index = torch.minimum(index.clamp(min=0), (lengths - 1).view(batch, 1, 1))
        stacked = torch.gather(features, 1, index.reshape(batch, -1, 1).expand(-1, -1, dim))
        return stacked.reshape(batch, steps, self.m * dim), out_lengths
