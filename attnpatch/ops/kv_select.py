"""Scoring and selection of KV-cache entries (pure tensor math, no model knowledge).

Shapes: query (B, Hq, Lq, D); key (B, Hkv, L, D); `allowed` is a boolean mask broadcastable to
(B, Hq, Lq, L) (True = the query may attend the key). Scores come out per kv head, (B, Hkv, L):
attention of the query group is summed over its Hq / Hkv query heads, so one selection serves
the whole group (GQA). Nothing here materialises more than (block x L) attention weights.
"""

from __future__ import annotations

import torch

from .reference import repeat_kv


def _grouped_sum(weights: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, Hq, ..., L) -> (B, Hkv, ..., L), summing each kv head's query group."""
    b, hq = weights.shape[:2]
    return weights.reshape(b, kv_heads, hq // kv_heads, *weights.shape[2:]).sum(dim=2)


def block_mask(valid: torch.Tensor | None, q_positions: torch.Tensor, length: int, heads: int) -> torch.Tensor:
    """(B, heads or 1, Lq, L) boolean: key j visible to a query at position p when j <= p and the
    key is valid. Keys are indexed 0..L-1 in position order; valid (B, Hkv or 1, L) or None."""
    causal = torch.arange(length, device=q_positions.device)[None, :] <= q_positions[:, None]
    if valid is None:
        return causal[None, None]
    if valid.shape[1] > 1 and valid.shape[1] != heads:
        valid = valid.repeat_interleave(heads // valid.shape[1], dim=1)
    return valid[:, :, None, :] & causal[None, None]


def attention_weights(query, key, allowed, scaling: float, softcap: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scaling [softcapped]) over allowed keys, float32, (B, Hq, Lq, L); rows with no
    key are 0."""
    scores = torch.matmul(query.float(), repeat_kv(key, query.shape[1] // key.shape[1]).float().transpose(-1, -2))
    scores = scores * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)


def window_attention_scores(query, key, valid, scaling: float, window: int, softcap: float | None = None) -> torch.Tensor:
    """Attention the last `window` queries (the newest positions) pay to every key, summed over
    them and over each query group: SnapKV's observation window; window=1 is TOVA's score."""
    length, obs = key.shape[-2], query[..., -window:, :]
    positions = torch.arange(length - obs.shape[-2], length, device=key.device)
    allowed = block_mask(valid, positions, length, query.shape[1])
    return _grouped_sum(attention_weights(obs, key, allowed, scaling, softcap), key.shape[1]).sum(dim=-2)


def accumulated_attention_scores(query, key, valid, scaling: float, block: int = 256,
                                 softcap: float | None = None) -> torch.Tensor:
    """Column sums of the causal attention matrix over all queries (H2O's heavy-hitter score),
    computed in query blocks so only (block x L) weights exist at a time. The queries are the
    newest Lq positions of the L keys."""
    length, lq = key.shape[-2], query.shape[-2]
    total = torch.zeros(key.shape[0], key.shape[1], length, dtype=torch.float32, device=key.device)
    for start in range(0, lq, block):
        q_blk = query[..., start : start + block, :]
        positions = torch.arange(length - lq + start, length - lq + start + q_blk.shape[-2], device=key.device)
        weights = attention_weights(q_blk, key, block_mask(valid, positions, length, query.shape[1]), scaling, softcap)
        total += _grouped_sum(weights, key.shape[1]).sum(dim=-2)
    return total


def pool_scores(scores: torch.Tensor, kernel: int, mode: str = "avg", valid: torch.Tensor | None = None) -> torch.Tensor:
    """Smooth scores along the sequence (SnapKV clusters kept tokens with a 1-D pooling). Only
    valid neighbours count, so padding never dilutes the scores of a sequence's first tokens."""
    if kernel <= 1:
        return scores
    shape, pad = scores.shape, kernel // 2
    flat = scores.float().reshape(-1, 1, shape[-1])
    mask = torch.ones_like(flat) if valid is None else valid.expand(shape).reshape(-1, 1, shape[-1]).float()
    if mode == "max":
        pooled = torch.nn.functional.max_pool1d(flat.masked_fill(mask == 0, float("-inf")), kernel, 1, pad)
    else:
        total = torch.nn.functional.avg_pool1d(flat * mask, kernel, 1, pad, count_include_pad=True)
        count = torch.nn.functional.avg_pool1d(mask, kernel, 1, pad, count_include_pad=True)
        pooled = total / count.clamp_min(1e-12)
    return pooled[..., : shape[-1]].reshape(shape)


def leading_invalid(valid: torch.Tensor) -> torch.Tensor:
    """Entries before each row's first valid one (a left-padded row's padding), reduced over the last dim."""
    return (~valid).long().cumprod(dim=-1).sum(dim=-1)


def valid_rank(valid: torch.Tensor) -> torch.Tensor:
    """Rank of each entry among the valid ones of its row, oldest = 0 (padding does not count)."""
    return torch.cumsum(valid.long(), -1) - 1


def select_indices(scores: torch.Tensor, valid: torch.Tensor, keep: torch.Tensor, sinks: int = 0,
                   recent: int | torch.Tensor = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Entries to keep per (sequence, kv head), in their original order, and their validity.

    scores, valid (bool): (B, Hkv, L). keep: (B,) entries each sequence keeps (capped by its
    valid entries). The `sinks` oldest and the `recent` newest valid entries are always kept; the
    rest of the budget goes to the highest scores (`recent` may be (B,), one count per sequence).
    Every row returns K = max(keep) slots; a
    sequence keeping fewer has its spare slots marked invalid."""
    valid_count = valid[:, 0].sum(-1)  # validity is the same for every head of a sequence
    keep = torch.minimum(keep.to(valid_count.device), valid_count)
    slots = int(keep.max()) if keep.numel() else 0
    oldest_rank = valid_rank(valid)
    newest_rank = valid_count[:, None, None] - 1 - oldest_rank  # 0 = newest
    if isinstance(recent, torch.Tensor):
        recent = recent.to(valid.device)[:, None, None]
    # tiers, best first: sinks, then the recent window newest first, then the rest by score; so when
    # the forced entries alone exceed a budget, the oldest recent entries are the ones that go
    sink = valid & (oldest_rank < sinks)
    fresh = valid & ~sink & (newest_rank < recent)
    tier = torch.where(sink, 3, torch.where(fresh, 2, torch.where(valid, 1, 0)))
    within = torch.nan_to_num(scores.float(), nan=float("-inf"))
    within = torch.where(sink, -oldest_rank.float(), torch.where(fresh, -newest_rank.float(), within))
    by_score = torch.argsort(within, dim=-1, descending=True, stable=True)
    by_tier = torch.argsort(torch.gather(tier, -1, by_score), dim=-1, descending=True, stable=True)
    top = torch.gather(by_score, -1, by_tier)[..., :slots]
    within_budget = torch.arange(slots, device=scores.device)[None, None, :] < keep[:, None, None]
    index, order = torch.sort(top, dim=-1)
    new_valid = torch.gather(valid, -1, index) & torch.gather(within_budget.expand_as(top), -1, order)
    return index, new_valid


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, Hkv, L, ...) gathered along L with index (B, Hkv, K)."""
    expand = index.reshape(*index.shape, *([1] * (x.dim() - 3))).expand(*index.shape, *x.shape[3:])
    return torch.gather(x, 2, expand)
