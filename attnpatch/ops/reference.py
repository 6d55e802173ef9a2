"""Naive O(n^2) attention: the ground truth every other op is tested against.

Conventions shared by all ops in this package:
  query (B, Hq, Lq, D), key/value (B, Hkv, Lk, D) with Hq a multiple of Hkv (GQA);
  `mask` is boolean, True = may attend, broadcastable to (B, Hq, Lq, Lk), or None;
  when `causal` is set, query i sits at absolute position Lk - Lq + i (bottom-right
  alignment, which is what a KV cache produces). Outputs are (B, Hq, Lq, D).
"""

from __future__ import annotations

import torch


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, Hkv, L, D) -> (B, Hkv * groups, L, D), each kv head repeated for its query group."""
    if groups == 1:
        return x
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)


def query_positions(lq: int, lk: int, device) -> torch.Tensor:
    """Absolute positions of the queries under bottom-right alignment."""
    return torch.arange(lk - lq, lk, device=device)


def causal_mask(lq: int, lk: int, device) -> torch.Tensor:
    """(Lq, Lk) boolean causal mask, bottom-right aligned."""
    return query_positions(lq, lk, device)[:, None] >= torch.arange(lk, device=device)[None, :]


def window_mask(
    lq: int, lk: int, window: int, sinks: int, causal: bool, device, q_pos: torch.Tensor | None = None,
    k_pos: torch.Tensor | None = None,
) -> torch.Tensor:
    """(Lq, Lk) boolean mask of the sliding-window-plus-sinks pattern.

    causal: query i sees the `window` most recent keys (itself included) and the first `sinks` keys.
    bidirectional: query i sees keys with |i - j| < window and the first `sinks` keys.
    """
    if q_pos is None:
        q_pos = query_positions(lq, lk, device) if causal else torch.arange(lq, device=device)
    if k_pos is None:
        k_pos = torch.arange(lk, device=device)
    dist = q_pos[:, None] - k_pos[None, :]
    if causal:
        allowed = (dist >= 0) & ((dist < window) | (k_pos[None, :] < sinks))
    else:
        allowed = (dist.abs() < window) | (k_pos[None, :] < sinks)
    return allowed


def combine_masks(mask: torch.Tensor | None, extra: torch.Tensor | None) -> torch.Tensor | None:
    if mask is None:
        return extra
    if extra is None:
        return mask
    return mask & extra


def naive_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    causal: bool = False,
    scaling: float | None = None,
    softcap: float | None = None,
    dropout: float = 0.0,
    training: bool = False,
    window: int | None = None,
    sinks: int = 0,
    masked_value: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scaling [softcapped] + mask) v, materialising the full score matrix.

    `masked_value` is what masked scores are set to: None gives -inf (rows with no visible key
    return 0); pass torch.finfo(dtype).min to reproduce transformers' eager path bit for bit,
    including its uniform weights on fully masked (padding) rows.
    """
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    lq, lk = query.shape[-2], key.shape[-2]
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    allowed = mask
    if causal:
        allowed = combine_masks(allowed, causal_mask(lq, lk, query.device))
    if window is not None:
        allowed = combine_masks(allowed, window_mask(lq, lk, window, sinks, causal, query.device))
    if allowed is not None:
        fill = float("-inf") if masked_value is None else masked_value
        if masked_value is not None:
            # eager adds the mask instead of filling: keep that arithmetic for exact parity
            scores = scores + torch.where(allowed, 0.0, fill).to(scores.dtype)
        else:
            scores = scores.masked_fill(~allowed, fill)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32)
    if masked_value is None and allowed is not None:
        weights = torch.nan_to_num(weights, nan=0.0)
    weights = weights.to(query.dtype)
    if dropout > 0.0 and training:
        weights = torch.nn.functional.dropout(weights, p=dropout, training=True)
    return torch.matmul(weights, value)
