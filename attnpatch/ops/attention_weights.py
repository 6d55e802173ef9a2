"""Materialised attention weights and the masks over stored tokens they use: softmax weights of a
query group without repeating keys, their product with values, and a causal-by-position mask over
entries stored out of order. Shapes as in reference.py; kv heads serve Hq / Hkv query heads each."""

from __future__ import annotations

import torch


def grouped_sum(weights: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, Hq, ..., L) -> (B, Hkv, ..., L), summing each kv head's query group."""
    b, hq = weights.shape[:2]
    return weights.reshape(b, kv_heads, hq // kv_heads, *weights.shape[2:]).sum(dim=2)


def block_mask(valid: torch.Tensor | None, q_positions: torch.Tensor, length: int, heads: int,
               key_positions: torch.Tensor | None = None) -> torch.Tensor:
    """(B, heads or 1, Lq, L) boolean: key j visible to a query at position p when the key's position
    is <= p and the key is valid. Key positions are their indices 0..L-1 unless `key_positions`
    (B, Hkv or 1, L) says otherwise (a cache that reuses freed slots is not in position order)."""
    if key_positions is None:
        causal = (torch.arange(length, device=q_positions.device)[None, :] <= q_positions[:, None])[None, None]
    else:
        causal = key_positions[:, :, None, :].long() <= q_positions[None, None, :, None]
        causal = _per_query_head(causal, heads)
    if valid is None:
        return causal
    return _per_query_head(valid, heads)[:, :, None, :] & causal


def _per_query_head(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, Hkv, ...) -> (B, heads, ...) when Hkv is neither 1 nor heads (GQA groups share a kv head)."""
    if x.shape[1] > 1 and x.shape[1] != heads:
        return x.repeat_interleave(heads // x.shape[1], dim=1)
    return x


def attention_weights(query, key, allowed, scaling: float, softcap: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scaling [softcapped]) over allowed keys, float32, (B, Hq, Lq, L); rows with no
    key are 0. Each kv head's query group is folded into the query dim (keys are never repeated)."""
    b, hq, lq, d = query.shape
    hkv = key.shape[1]
    folded = (query.float() * scaling).reshape(b, hkv, (hq // hkv) * lq, d)  # scaled before: Lq x D, not Lq x L
    scores = torch.matmul(folded, key.float().transpose(-1, -2)).reshape(b, hq, lq, key.shape[-2])
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if allowed is None:
        return torch.softmax(scores, dim=-1)
    weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    # a row with no key is NaN in every column, any other row in none: one column tells
    if not bool(torch.isnan(weights[..., 0]).any()):
        return weights
    return torch.nan_to_num(weights, nan=0.0)


def grouped_output(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """weights (B, Hq, Lq, L) @ values (B, Hkv, L, D) per query group, without repeating the values."""
    b, hq, lq, length = weights.shape
    hkv = values.shape[1]
    folded = weights.to(values.dtype).reshape(b, hkv, (hq // hkv) * lq, length)
    return torch.matmul(folded, values).reshape(b, hq, lq, values.shape[-1])
