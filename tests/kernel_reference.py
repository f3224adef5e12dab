"""numpy references of the beam-search CUDA kernels (fairseq_accel/kernels/beam_search_kernels.cu),
written straight from their specification in fairseq_accel/inference/cuda_kernels.py.

Quantization and the token scores use float32 operations in the kernels' order, so they match the
kernels bit for bit; attention and the log-sum-exp are computed in float64.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

LEVELS = np.float32(127)
EOS_NORMAL, EOS_FORBIDDEN, EOS_ONLY = 0, 1, 2


def quantize(x: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Per-vector (last axis) absmax int8 quantization: (levels int8 [..., D], scales float32 [...])."""
    x = np.asarray(x).astype(np.float32)
    absmax = np.abs(x).max(axis=-1)
    nonzero = absmax > 0
    inv_scale = np.zeros_like(absmax)
    np.divide(LEVELS, absmax, out=inv_scale, where=nonzero)
    scale = np.zeros_like(absmax)
    np.divide(absmax, LEVELS, out=scale, where=nonzero)
    levels = np.clip(np.rint(x * inv_scale[..., None]), -LEVELS, LEVELS).astype(np.int8)
    return levels, scale


def quantize_write(x: np.ndarray, cache: np.ndarray, scales: np.ndarray, step: int) -> None:
    """Write x [B*beam, H, D] quantized into cache [B, H, T_max, beam, D] and scales [B, H, T_max, beam]."""
    batch, num_heads, _, beam, head_dim = cache.shape
    levels, scale = quantize(x)
    cache[:, :, step] = levels.reshape(batch, beam, num_heads, head_dim).transpose(0, 2, 1, 3)
    scales[:, :, step] = scale.reshape(batch, beam, num_heads).transpose(0, 2, 1)


def dequantize(levels: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float64 values of an int8 cache: levels [..., D] times their per-vector scale [...]."""
    return levels.astype(np.float64) * scales.astype(np.float64)[..., None]


def int8_cache_attention(q, k_cache, v_cache, k_scale, v_scale, indir, n_steps) -> np.ndarray:
    """float64 [B*beam, H, D]: sum over t < n_steps of softmax_t(q . k_hat) v_hat, where the key and value of
    row r = b*beam + i at time t are in beam slot indir[b, i, t] of the dequantized cache."""
    batch, num_heads, _, beam, _ = k_cache.shape
    rows = np.arange(batch * beam)
    b, i = rows // beam, rows % beam
    slots = indir[b, i, :n_steps]  # [N, n]
    select = (b[:, None, None], np.arange(num_heads)[None, :, None], np.arange(n_steps)[None, None, :],
              slots[:, None, :])
    keys = dequantize(k_cache, k_scale)[select]  # [N, H, n, D]
    values = dequantize(v_cache, v_scale)[select]
    scores = np.einsum("rhd,rhtd->rht", q.astype(np.float64), keys)
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    return np.einsum("rht,rhtd->rhd", weights, values)


def logsumexp(logits: np.ndarray) -> np.ndarray:
    """float32 [N]: log-sum-exp of each row, computed in float64 (NaN if the row has a NaN)."""
    x = logits.astype(np.float64)
    top = x.max(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore"):
        return (top[:, 0] + np.log(np.exp(x - top).sum(axis=-1))).astype(np.float32)


def token_scores(logits, lse, row_bias, pad_idx, unk_idx, eos_idx, unk_penalty=0.0, eos_mode=EOS_NORMAL) -> np.ndarray:
    """float32 [N, V]: lp = logits - lse, then pad -inf, unk - penalty, the eos rule, NaN -> -inf, + row_bias."""
    with np.errstate(invalid="ignore"):
        lp = logits.astype(np.float32) - np.asarray(lse, np.float32)[:, None]
        lp[:, pad_idx] = -np.inf
        lp[:, unk_idx] -= np.float32(unk_penalty)
        if eos_mode == EOS_FORBIDDEN:
            lp[:, eos_idx] = -np.inf
        elif eos_mode == EOS_ONLY:
            keep = lp[:, eos_idx].copy()
            lp[:] = -np.inf
            lp[:, eos_idx] = keep
        lp[np.isnan(lp)] = -np.inf
        scores = lp + np.asarray(row_bias, np.float32)[:, None]
        scores[np.isnan(scores)] = -np.inf
    return scores


def top_k(scores: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """The k largest of each row, descending, the smaller index first among equal values."""
    order = np.stack([np.lexsort((np.arange(row.size), -row)) for row in scores])[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


def log_softmax_topk(logits, row_bias, k, pad_idx, unk_idx, eos_idx, unk_penalty=0.0, eos_mode=EOS_NORMAL):
    """(values float32 [N, k], indices int64 [N, k], lse float32 [N]) as the fused kernel defines them."""
    lse = logsumexp(logits)
    scores = token_scores(logits, lse, row_bias, pad_idx, unk_idx, eos_idx, unk_penalty, eos_mode)
    values, indices = top_k(scores, k)
    return values, indices.astype(np.int64), lse
