"""Scoring and selection of KV-cache entries (pure tensor math, no model knowledge).

Shapes: query (B, Hq, Lq, D); key (B, Hkv, L, D); `allowed` is a boolean mask broadcastable to
(B, Hq, Lq, L) (True = the query may attend the key). Scores come out per kv head, (B, Hkv, L):
attention of the query group is summed over its Hq / Hkv query heads, so one selection serves
the whole group (GQA). Nothing here materialises more than (block x L) attention weights.
"""

from __future__ import annotations

import torch

from .attention_weights import attention_weights, block_mask, grouped_output, grouped_sum
from .token_ranks import position_rank, valid_rank


def window_attention_scores(query, key, valid, scaling: float, window: int, softcap: float | None = None,
                            key_positions: torch.Tensor | None = None) -> torch.Tensor:
    """Attention the last `window` queries (the newest positions) pay to every key, summed over
    them and over each query group: SnapKV's observation window; window=1 is TOVA's score.
    `key_positions` (B, Hkv, L): the keys' positions when they are not 0..L-1 (see block_mask)."""
    length, obs = key.shape[-2], query[..., -window:, :]
    last = length - 1 if key_positions is None else int(key_positions.max())
    positions = torch.arange(last + 1 - obs.shape[-2], last + 1, device=key.device)
    allowed = block_mask(valid, positions, length, query.shape[1], key_positions)
    return grouped_sum(attention_weights(obs, key, allowed, scaling, softcap), key.shape[1]).sum(dim=-2)


def accumulated_attention_scores(query, key, valid, scaling: float, block: int = 256,
                                 softcap: float | None = None, key_positions: torch.Tensor | None = None,
                                 reduce: str = "sum", query_valid: torch.Tensor | None = None,
                                 values: torch.Tensor | None = None):
    """Column sums of the causal attention matrix over all queries (H2O's heavy-hitter score), or
    with reduce="max" the largest weight any query of a kv head's group gives each key (KVzip),
    computed in query blocks so only (block x L) weights exist at a time. The queries are the
    newest Lq positions of the keys (`key_positions` as in window_attention_scores); queries where
    `query_valid` (B, Lq) is False (padding inside the sequence) give nothing. With `values`
    (B, Hkv, L, D), the attention output (B, Hq, Lq, D) of the same weights comes back too:
    (scores, output), one pass instead of a separate attention call."""
    length, lq = key.shape[-2], query.shape[-2]
    end = length if key_positions is None else int(key_positions.max()) + 1
    total = torch.zeros(key.shape[0], key.shape[1], length, dtype=torch.float32, device=key.device)
    outputs = []
    for start in range(0, lq, block):
        q_blk = query[..., start : start + block, :]
        positions = torch.arange(end - lq + start, end - lq + start + q_blk.shape[-2], device=key.device)
        allowed = block_mask(valid, positions, length, query.shape[1], key_positions)
        weights = attention_weights(q_blk, key, allowed, scaling, softcap)
        if values is not None:
            outputs.append(grouped_output(weights, values))
        if query_valid is not None:
            weights = weights * query_valid[:, None, start : start + block, None].to(weights.dtype)
        if reduce == "max":
            b, hq = weights.shape[:2]
            grouped = weights.reshape(b, key.shape[1], hq // key.shape[1], *weights.shape[2:])
            total = torch.maximum(total, grouped.amax(dim=(2, 3)))
        else:
            total += grouped_sum(weights, key.shape[1]).sum(dim=-2)
    return total if values is None else (total, torch.cat(outputs, dim=-2))


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


def select_mask(scores: torch.Tensor, valid: torch.Tensor, keep: torch.Tensor, sinks: int = 0,
                recent: int | torch.Tensor = 0, positions: torch.Tensor | None = None,
                head_adaptive: float | None = None) -> torch.Tensor:
    """(B, Hkv, L) bool: the entries each (sequence, kv head) keeps.

    scores, valid (bool): (B, Hkv, L). keep: (B,) entries each sequence keeps per kv head (capped by
    its valid entries). The `sinks` oldest and the `recent` newest valid entries are always kept; the
    rest of the budget goes to the highest scores (`recent` may be (B,), one count per sequence).
    `positions` orders the entries when they are not stored oldest first.
    head_adaptive (AdaKV): the sequence's budget over all its kv heads, keep x Hkv, goes to the best
    entries wherever they are, except that each head first keeps its `head_adaptive` share of
    `keep` best entries; so heads whose attention is spread keep more than focused heads."""
    heads = valid.shape[1]
    valid_count = valid.sum(-1)  # (B, Hkv)
    oldest_rank = valid_rank(valid) if positions is None else position_rank(positions, valid)
    newest_rank = valid_count[..., None] - 1 - oldest_rank  # 0 = newest
    if isinstance(recent, torch.Tensor):
        recent = recent.to(valid.device)[:, None, None]
    # tiers, best first: sinks, then the recent window newest first, then (adaptive) each head's
    # protected share, then the rest by score; so when the forced entries alone exceed a budget,
    # the oldest recent entries are the ones that go
    sink = valid & (oldest_rank < sinks)
    fresh = valid & ~sink & (newest_rank < recent)
    tier = torch.where(sink, 4, torch.where(fresh, 3, torch.where(valid, 1, 0)))
    within = torch.nan_to_num(scores.float(), nan=float("-inf"))
    within = torch.where(sink, -oldest_rank.float(), torch.where(fresh, -newest_rank.float(), within))
    keep = keep.to(valid.device)
    if head_adaptive is not None:
        share = torch.floor(keep.float() * head_adaptive).long()[:, None, None]
        score_rank = torch.argsort(torch.argsort(torch.where(tier == 1, within, float("-inf")), dim=-1,
                                                 descending=True, stable=True), dim=-1)
        tier = torch.where((tier == 1) & (score_rank < share), 2, tier)
        b, length = valid.shape[0], valid.shape[-1]
        chosen = _top_by_tier(tier.reshape(b, 1, -1), within.reshape(b, 1, -1),
                              torch.minimum(keep * heads, valid_count.sum(-1))[:, None])
        return chosen.reshape(b, heads, length)
    return _top_by_tier(tier, within, torch.minimum(keep[:, None], valid_count))


def _top_by_tier(tier: torch.Tensor, within: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(B, H, L) bool: per row, the `keep` (B, H) best entries by tier, then by score within a tier."""
    by_score = torch.argsort(within, dim=-1, descending=True, stable=True)
    by_tier = torch.argsort(torch.gather(tier, -1, by_score), dim=-1, descending=True, stable=True)
    ranked = torch.gather(by_score, -1, by_tier)  # entry indices, best first
    slots = int(keep.max()) if keep.numel() else 0
    take = torch.arange(slots, device=tier.device) < keep[..., None]
    chosen = torch.zeros_like(tier, dtype=torch.bool)
    return chosen.scatter_(-1, ranked[..., :slots], take)


def compact(chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The chosen entries of each row (B, H, L) packed to the front in their stored order: index
    (B, H, K) with K = the largest row's count, and its validity (a row keeping fewer has spare,
    invalid slots)."""
    slots = int(chosen.sum(-1).max()) if chosen.numel() else 0
    index = torch.argsort((~chosen).to(torch.uint8), dim=-1, stable=True)[..., :slots]
    return index, torch.gather(chosen, -1, index)


def evict_lowest(scores: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor,
                 sinks: int, recent: torch.Tensor, newest: int) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """select_mask for a cache that is at most a few entries over budget (a decoding step), in
    O(L) instead of sorting: the sinks are the oldest valid positions and the recent window the
    newest positions (neither is ever evicted, so both are contiguous), and each row drops its
    `count - keep` lowest-scoring other entries. Returns None when those are too few (then the
    forced entries themselves are over budget: use select_mask). recent (B,); newest: the newest
    position. Returns (kept mask, the freed slots (B, H, e) when every row freed e, else None)."""
    count = valid.sum(-1)  # (B, H)
    excess = count - keep.to(count.device)[:, None]
    most = int(excess.max())
    if most <= 0:
        return valid, None
    # one pass of few ops: a decoding step runs this once per layer and per token
    oldest = torch.where(valid, positions, torch.iinfo(positions.dtype).max).amin(-1, keepdim=True)
    candidates = valid & (positions >= oldest + sinks) & (positions <= newest - recent.to(valid.device)[:, None, None])
    every_row_frees = bool((excess == most).all())
    if most == 1 and every_row_frees:  # the usual step: one new token, one eviction per row
        # NaN scores are taken first by argmin (as -inf would be); a row whose lowest is +inf has no
        # candidate: the forced entries alone are over budget
        key = torch.where(candidates, scores, float("inf"))
        lowest = key.argmin(-1, keepdim=True)
        if bool(torch.isinf(key.gather(-1, lowest)).any()):
            return None
        return valid.scatter(-1, lowest, False), lowest
    if bool((candidates.sum(-1) < excess).any()):
        return None
    key = torch.where(candidates, torch.nan_to_num(scores.float(), nan=float("-inf")), float("inf"))
    lowest = torch.topk(key, most, dim=-1, largest=False).indices
    drop = torch.arange(most, device=valid.device) < excess[..., None]
    kept = valid & ~torch.zeros_like(valid).scatter_(-1, lowest, drop)
    return kept, (lowest.contiguous() if every_row_frees else None)


