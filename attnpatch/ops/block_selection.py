"""Query-aware block selection (block top-k, Quest / MoBA style): key blocks are scored against the
queries at hand and each query block keeps its best ones, as a `BlockLayout` (block_sparse.py).
`block_topk_recall` measures, with the exact softmax, how much attention each budget keeps."""

from __future__ import annotations

import math

import torch

from .block_sparse import BlockLayout, grid
from .segments import RECYCLED_SEGMENT_BYTES, segment_bytes
from .sparse_patterns import _allowed_blocks, layout_from_block_mask


def _real_rows(lq: int, lk: int, block_size: int, causal: bool, device) -> torch.Tensor:
    """(nQ, bs) boolean: which rows of the call's block grid hold a query (not front or back padding)."""
    _, pad, nq, _ = grid(lq, lk, block_size, causal)
    real = torch.zeros(nq * block_size, dtype=torch.bool, device=device)
    real[pad : pad + lq] = True
    return real.view(nq, block_size)


def _padded_queries(query: torch.Tensor, lk: int, block_size: int, causal: bool) -> torch.Tensor:
    """(B, Hq, nQ * bs, D) queries on the block grid (zero rows where the grid has no query); the
    queries themselves when they fill it (no copy)."""
    lq = query.shape[-2]
    _, pad, nq, _ = grid(lq, lk, block_size, causal)
    if pad == 0 and nq * block_size == lq:
        return query
    return torch.nn.functional.pad(query, (0, 0, pad, nq * block_size - lq - pad))


def pooled_queries(query: torch.Tensor, lk: int, block_size: int, causal: bool) -> torch.Tensor:
    """(B, Hq, nQ, D): the mean of each query block's real rows on the call's block grid."""
    real = _real_rows(query.shape[-2], lk, block_size, causal, query.device)
    summed = _padded_queries(query, lk, block_size, causal).unflatten(-2, real.shape).sum(-2)  # padding rows are 0
    return summed / real.sum(-1).clamp_min(1)[:, None].to(query.dtype)


def _block_stat(key: torch.Tensor, valid: torch.Tensor | None, block_size: int, how: str) -> torch.Tensor:
    """(B, Hkv, nK, D) mean / max / min of each key block over its valid keys."""
    b, h, lk, d = key.shape
    nk = math.ceil(lk / block_size)
    if valid is None and nk * block_size == lk:  # whole blocks of real keys: no mask, no copy
        blocks = key.float().view(b, h, nk, block_size, d)
        return blocks.mean(-2) if how == "mean" else blocks.amax(-2) if how == "max" else blocks.amin(-2)
    padded = torch.nn.functional.pad(key.float(), (0, 0, 0, nk * block_size - lk)).view(b, h, nk, block_size, d)
    ok = torch.arange(nk * block_size, device=key.device) < lk
    ok = ok.view(1, 1, nk, block_size, 1)
    if valid is not None:
        ok = ok & torch.nn.functional.pad(valid, (0, nk * block_size - lk)).view(b, 1, nk, block_size, 1)
    if how == "mean":
        return (padded * ok).sum(-2) / ok.sum(-2).clamp_min(1)
    fill = float("-inf") if how == "max" else float("inf")
    stat = padded.masked_fill(~ok, fill)
    stat = stat.amax(-2) if how == "max" else stat.amin(-2)
    return torch.nan_to_num(stat.masked_fill(~ok.any(-2), 0.0), posinf=0.0, neginf=0.0)


def _estimate(q: torch.Tensor, stats: list[torch.Tensor], pooling: str) -> torch.Tensor:
    """(..., n, nK) estimates of q . k for (..., n, D) queries and (..., D, nK) key-block summaries:
    q . mean(k), or Quest's bound q+ . max + q- . min."""
    if pooling == "mean":
        return q @ stats[0]
    return q.clamp_min(0) @ stats[0] + q.clamp_max(0) @ stats[1]


def block_scores(query: torch.Tensor, key: torch.Tensor, block_size: int, *, causal: bool, pooling: str,
                 valid: torch.Tensor | None = None, query_pooling: str = "max") -> torch.Tensor:
    """(B, Hkv, nQ, nK) importance of key block kb for query block qb: the largest estimate of
    q . k over the block's queries and the kv head's query group (causal: -inf past the diagonal).
    pooling 'mean': q . mean(k) (MoBA); 'maxmin': Quest's upper bound
    sum_d max(q_d max_d k, q_d min_d k) = q+ . max + q- . min. query_pooling 'max' scores every
    query (a block counts as much as its most interested query); 'mean' scores each query block's
    mean query instead (MInference's block-sparse estimate): block_size times fewer products, the
    largest over the query group kept. Query blocks are scored a chunk at a time, so memory stays
    bounded at any length. Selection is not differentiable, so neither are the scores."""
    if query_pooling not in ("max", "mean"):
        raise ValueError(f"query_pooling must be 'max' or 'mean', got {query_pooling!r}")
    query, key = query.detach().float(), key.detach()
    b, hq, lq, d = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    first, _, nq, nk = grid(lq, lk, block_size, causal)
    hows = ("mean",) if pooling == "mean" else ("max", "min")
    stats = [_block_stat(key, valid, block_size, how).transpose(-1, -2) for how in hows]  # (B, Hkv, D, nK)
    if query_pooling == "mean":
        means = pooled_queries(query, lk, block_size, causal).view(b, hkv, hq // hkv, nq, d)
        scores = _estimate(means[:, :, 0], stats, pooling)  # (B, Hkv, nQ, nK)
        for g in range(1, hq // hkv):
            torch.maximum(scores, _estimate(means[:, :, g], stats, pooling), out=scores)
    else:
        scores = _per_query_scores(query, stats, pooling, lk, block_size, causal)
    if causal:  # every block past a row's diagonal (the per-query chunks leave some unset)
        diagonal = torch.arange(first, first + nq, device=query.device)[:, None]
        scores.masked_fill_(torch.arange(nk, device=query.device) > diagonal, float("-inf"))
    return scores


def _per_query_scores(query: torch.Tensor, stats: list[torch.Tensor], pooling: str, lk: int, block_size: int,
                      causal: bool) -> torch.Tensor:
    """block_scores with query_pooling='max', from the float queries (B, Hq, Lq, D)."""
    b, hq, lq, d = query.shape
    hkv, nk = stats[0].shape[1], stats[0].shape[-1]
    groups = hq // hkv
    first, pad, nq, _ = grid(lq, lk, block_size, causal)
    back = nq * block_size - lq - pad
    rows_ok = _real_rows(lq, lk, block_size, causal, query.device)
    partial = sorted({j for j, padded in ((0, pad), (nq - 1, back)) if padded})  # blocks with padding rows
    # (B, Hkv, G, nQ * bs, D): a chunk of query blocks is a slice of rows, scored per head without a copy
    q = _padded_queries(query, lk, block_size, causal).view(b, hkv, groups, nq * block_size, d)
    # causal: a chunk of query blocks scores only the key blocks up to its last row's diagonal (about
    # half the work); later blocks are inadmissible (block_scores sets them to -inf)
    scores = q.new_empty(b, hkv, nq, nk)
    # per-query block scores materialised at once: on the CPU a few MiB that the allocator recycles
    # (64 MiB chunks measured 1.25-1.5x slower at 16k-32k: fresh pages every chunk)
    score_elements = segment_bytes(q.device, RECYCLED_SEGMENT_BYTES) // 4
    step = max(1, score_elements // (b * hq * block_size * nk))
    for start in range(0, nq, step):
        stop = min(nq, start + step)
        width = min(nk, first + stop) if causal else nk
        rows = q[:, :, :, start * block_size : stop * block_size]
        per_query = _estimate(rows, [s[..., :width].unsqueeze(2) for s in stats], pooling)
        per_query = per_query.view(b, hkv, groups, stop - start, block_size, width)
        for j in partial:  # padding rows of the first / last block must not win the max with their 0
            if start <= j < stop:
                per_query[:, :, :, j - start].masked_fill_(~rows_ok[j][:, None], float("-inf"))
        scores[:, :, start:stop, :width] = per_query.amax(dim=4).amax(dim=2)
    return scores


def _topk_ranking(query: torch.Tensor, key: torch.Tensor, block_size: int, *, causal: bool, pooling: str,
                  query_pooling: str, sink_blocks: int, local_blocks: int, valid: torch.Tensor | None,
                  limit: int | None = None, scores: torch.Tensor | None = None):
    """(first, fixed (nQ, nK) blocks always kept, ranked): `ranked` holds, per (B, Hkv, query block),
    the other admissible blocks from best to worst score as (values, indices) of a full topk (the
    best `limit` only, when given); values are -inf past the last candidate. `scores` (B, Hkv, nQ,
    nK) replaces the pooled-key estimate (a learned gate's)."""
    lq, lk = query.shape[-2], key.shape[-2]
    first, _, nq, nk = grid(lq, lk, block_size, causal)
    qb, kb, allowed = _allowed_blocks(first, nq, nk, causal, query.device)
    fixed = allowed & (((qb - kb) < local_blocks) & ((qb - kb) > -local_blocks) | (kb < sink_blocks))
    if scores is None:
        scores = block_scores(query, key, block_size, causal=causal, pooling=pooling, valid=valid,
                              query_pooling=query_pooling)
    if valid is not None:  # blocks of padding only are never worth computing
        block_has_key = torch.nn.functional.pad(valid, (0, nk * block_size - lk)).view(valid.shape[0], nk, -1).any(-1)
        allowed = allowed & block_has_key[:, None, None, :]
    scores = scores.masked_fill(~(allowed & ~fixed), float("-inf"))
    if limit is not None and limit < nk:  # a partial selection is O(nK) per row; a full sort is not
        return first, fixed, scores.topk(limit, dim=-1)
    ranked = scores.sort(dim=-1, descending=True)
    return first, fixed, ranked


def block_topk(query: torch.Tensor, key: torch.Tensor, block_size: int, *, causal: bool, top_k,
               pooling: str = "mean", query_pooling: str = "max", sink_blocks: int = 0, local_blocks: int = 1,
               valid: torch.Tensor | None = None, scores: torch.Tensor | None = None) -> BlockLayout:
    """Per query block and kv head: the `local_blocks` nearest blocks (the diagonal first), the
    first `sink_blocks`, and the `top_k` best-scoring other admissible blocks (`block_scores`, or
    the given (B, Hkv, nQ, nK) `scores`). top_k: an int, or a (Hkv,) tensor of per-head budgets."""
    budgets = torch.as_tensor(top_k).reshape(-1)  # (1,) or (Hkv,)
    limit = max(1, int(budgets.max()))  # read where the budgets were given: a GPU copy would be waited for
    budgets = budgets.to(query.device)
    first, fixed, ranked = _topk_ranking(query, key, block_size, causal=causal, pooling=pooling,
                                         query_pooling=query_pooling, sink_blocks=sink_blocks,
                                         local_blocks=local_blocks, valid=valid, limit=limit, scores=scores)
    mask = fixed.expand(*ranked.values.shape[:-1], fixed.shape[-1]).clone()
    rank = torch.arange(ranked.indices.shape[-1], device=query.device)
    take = (rank < budgets.view(1, -1, 1, 1)) & torch.isfinite(ranked.values)
    mask.scatter_(-1, ranked.indices, take | mask.gather(-1, ranked.indices))
    return layout_from_block_mask(mask, block_size, first)


def block_topk_recall(query: torch.Tensor, key: torch.Tensor, block_size: int, *, causal: bool, scaling: float,
                      pooling: str = "mean", query_pooling: str = "max", sink_blocks: int = 0,
                      local_blocks: int = 1, mask: torch.Tensor | None = None, valid: torch.Tensor | None = None,
                      softcap: float | None = None, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention recall of block top-k at every budget: (recall_sum (Hkv, nK + 1), rows (Hkv,)).
    recall_sum[h, k] sums, over the call's queries (and the kv head's query group), the softmax
    mass that block_topk with top_k=k keeps; divide by rows for the mean. The exact softmax is
    computed `chunk` queries at a time (the model's mask and causality apply)."""
    b, hq, lq, d = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    groups = hq // hkv
    first, fixed, ranked = _topk_ranking(query, key, block_size, causal=causal, pooling=pooling,
                                         query_pooling=query_pooling, sink_blocks=sink_blocks,
                                         local_blocks=local_blocks, valid=valid)
    nk = ranked.values.shape[-1]
    keys = key.float().repeat_interleave(groups, dim=1)
    k_block = torch.arange(lk, device=query.device) // block_size
    q_pos = torch.arange(lk - lq, lk, device=query.device) if causal else torch.arange(lq, device=query.device)
    recall = torch.zeros(hkv, nk + 1, device=query.device)
    rows = torch.zeros(hkv, device=query.device)
    for start in range(0, lq, chunk):
        q = query[:, :, start : start + chunk].float()
        scores = (q @ keys.transpose(-1, -2)) * scaling
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        allowed = torch.ones(scores.shape[-2:], dtype=torch.bool, device=query.device)
        if causal:
            allowed = q_pos[start : start + chunk, None] >= torch.arange(lk, device=query.device)[None, :]
        if mask is not None:
            allowed = allowed & mask[..., start : start + chunk, :] if mask.shape[-2] > 1 else allowed & mask
        weights = torch.nan_to_num(scores.masked_fill(~allowed, float("-inf")).softmax(-1), nan=0.0)
        # mass per key block: (B, Hq, n, nK)
        mass = torch.zeros(*weights.shape[:-1], nk, device=query.device).index_add_(-1, k_block, weights)
        qb = (q_pos[start : start + chunk] // block_size - first).clamp(0, ranked.indices.shape[-2] - 1)
        order = ranked.indices.repeat_interleave(groups, dim=1)[:, :, qb]  # (B, Hq, n, nK) best first
        finite = torch.isfinite(ranked.values).repeat_interleave(groups, dim=1)[:, :, qb]
        in_order = mass.gather(-1, order) * finite
        base = (mass * fixed[qb]).sum(-1, keepdim=True)
        curve = torch.cat([base, base + in_order.cumsum(-1)], dim=-1)  # (B, Hq, n, nK + 1)
        has_key = weights.sum(-1) > 0  # rows with no visible key (padding) do not count
        curve = (curve * has_key[..., None]).view(b, hkv, groups, -1, nk + 1).sum(dim=(0, 2, 3))
        recall += curve
        rows += has_key.view(b, hkv, groups, -1).sum(dim=(0, 2, 3))
    return recall, rows
