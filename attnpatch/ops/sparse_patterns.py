"""Sparse attention patterns as block layouts (see block_sparse.py): which key blocks each query
block computes. Static patterns (A-shape, BigBird, Star) depend only on positions; vertical-slash
ranks lines by the last queries' attention (block top-k: block_selection.py). Every builder works
on the block grid of a call: `first` (absolute index of query block row 0), `nq` rows, `nk` key
blocks; rows may only keep key blocks <= their own index when causal."""

from __future__ import annotations

import torch

from .block_sparse import BlockLayout, grid


def _allowed_blocks(first: int, nq: int, nk: int, causal: bool, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(qb (nQ,1), kb (1,nK), allowed (nQ, nK)): absolute block indices and causal admissibility."""
    qb = torch.arange(first, first + nq, device=device)[:, None]
    kb = torch.arange(nk, device=device)[None, :]
    allowed = kb <= qb if causal else torch.ones(nq, nk, dtype=torch.bool, device=device)
    return qb, kb, allowed


def layout_from_block_mask(mask: torch.Tensor, block_size: int, first: int,
                           extra_keys: torch.Tensor | None = None) -> BlockLayout:
    """(B|1, H|1, nQ, nK) boolean -> BlockLayout listing each row's kept blocks (ascending)."""
    while mask.dim() < 4:
        mask = mask[None]
    width = max(1, int(mask.sum(-1).max()))
    nk = mask.shape[-1]
    # kept blocks first, in ascending order: sort by (not kept, index)
    key = (~mask).to(torch.int32) * nk + torch.arange(nk, device=mask.device, dtype=torch.int32)
    order = key.topk(width, dim=-1, largest=False).indices  # sorted, and O(nK) per row for a few kept
    kv_blocks = torch.where(mask.gather(-1, order), order, -1)
    return BlockLayout(kv_blocks, block_size, first, nk, extra_keys)


def a_shape(lq: int, lk: int, block_size: int, *, causal: bool, sink_blocks: int, local_blocks: int,
            device=None) -> BlockLayout:
    """The first `sink_blocks` key blocks plus the `local_blocks` nearest (causal: the diagonal and
    the ones before it; bidirectional: |qb - kb| < local_blocks)."""
    first, _, nq, nk = grid(lq, lk, block_size, causal)
    qb, kb, allowed = _allowed_blocks(first, nq, nk, causal, device)
    local = (qb - kb < local_blocks) if causal else ((qb - kb).abs() < local_blocks)
    return layout_from_block_mask(allowed & (local | (kb < sink_blocks)), block_size, first)


def bigbird(lq: int, lk: int, block_size: int, *, causal: bool, window_blocks: int, global_blocks: int,
            random_blocks: int, heads: int, seed: int, device=None) -> BlockLayout:
    """BigBird: a window of blocks (|qb - kb| <= window_blocks, causal: the ones before), the first
    `global_blocks` as global keys and queries (global query rows attend everything allowed), and
    `random_blocks` further blocks per row and kv head, drawn from a seeded generator."""
    first, _, nq, nk = grid(lq, lk, block_size, causal)
    qb, kb, allowed = _allowed_blocks(first, nq, nk, causal, device)
    near = (qb - kb).abs() <= window_blocks
    mask = allowed & (near | (kb < global_blocks) | (qb < global_blocks))
    mask = mask[None].expand(heads, -1, -1).clone()
    if random_blocks > 0:
        g = torch.Generator().manual_seed(seed)
        draw = torch.rand(heads, nq, nk, generator=g).to(mask.device)
        draw = draw.masked_fill(~allowed | mask, -1.0)
        picked = draw.topk(min(random_blocks, nk), dim=-1)
        mask.scatter_(-1, picked.indices, (picked.values >= 0) | mask.gather(-1, picked.indices))
    return layout_from_block_mask(mask[None], block_size, first)


def star(lq: int, lk: int, block_size: int, *, causal: bool, context_blocks: int, anchor_blocks: int,
         query_tokens: int, device=None) -> BlockLayout:
    """Star Attention: the context is split into chunks of `context_blocks` blocks; a query block
    attends its own chunk (causal: up to itself) and the first `anchor_blocks` blocks (the anchor);
    the blocks holding the last `query_tokens` positions attend everything (global phase)."""
    first, _, nq, nk = grid(lq, lk, block_size, causal)
    qb, kb, allowed = _allowed_blocks(first, nq, nk, causal, device)
    same_chunk = (qb // context_blocks) == (kb // context_blocks)
    global_rows = (qb + 1) * block_size > lk - query_tokens
    return layout_from_block_mask(allowed & (same_chunk | (kb < anchor_blocks) | global_rows), block_size, first)


def vertical_slash(query: torch.Tensor, key: torch.Tensor, block_size: int, *, scaling: float, last_q: int,
                   vertical: int, slash: int, valid: torch.Tensor | None = None) -> BlockLayout:
    """MInference's vertical-slash pattern (causal): the last `last_q` queries' softmax attention,
    summed over them and the query group, ranks key columns (vertical lines) and diagonals
    q_pos - k_pos (slash lines) per kv head. The top `vertical` columns are kept as single keys,
    the top `slash` diagonals (the main one always) as the key blocks their band crosses, so a
    diagonal is computed as a band one block wide (as block kernels do)."""
    b, hq, lq, d = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    groups = hq // hkv
    first, _, nq, nk = grid(lq, lk, block_size, True)
    obs = query[..., -min(last_q, lq):, :].float()
    n_obs = obs.shape[-2]
    scores = (obs.view(b, hkv, groups, n_obs, d) @ key.float()[:, :, None].transpose(-1, -2)) * scaling
    q_pos = torch.arange(lk - n_obs, lk, device=query.device)
    k_pos = torch.arange(lk, device=query.device)
    ok = (k_pos[None, :] <= q_pos[:, None])[None, None, None]
    if valid is not None:
        ok = ok & valid[:, None, None, None, :]
    weights = torch.nan_to_num(torch.softmax(scores.masked_fill(~ok, float("-inf")), dim=-1), nan=0.0)
    column = weights.sum(dim=(2, 3))  # (B, Hkv, Lk)
    offsets = (q_pos[:, None] - k_pos[None, :]).clamp_min(0).expand(b, hkv, groups, -1, -1)
    diagonal = torch.zeros(b, hkv, lk, device=query.device).scatter_add_(
        -1, offsets.reshape(b, hkv, -1), weights.reshape(b, hkv, -1))
    diagonal[..., 0] = float("inf")  # the main diagonal always
    top_offsets = diagonal.topk(min(slash, lk), dim=-1).indices  # (B, Hkv, S)
    top_columns = column.topk(min(vertical, lk), dim=-1).indices  # (B, Hkv, V)
    # slash bands -> blocks: rows of query block qb (positions p) reach keys p - o, which fall in
    # key blocks (qb*bs - o) // bs and (qb*bs + bs - 1 - o) // bs
    qb, kb, allowed = _allowed_blocks(first, nq, nk, True, query.device)
    lo = (qb.view(1, 1, nq, 1) * block_size - top_offsets[:, :, None, :]).div(block_size, rounding_mode="floor")
    hi = (qb.view(1, 1, nq, 1) * block_size + block_size - 1 - top_offsets[:, :, None, :]).div(
        block_size, rounding_mode="floor")
    mask = torch.zeros(b, hkv, nq, nk + 1, dtype=torch.bool, device=query.device)
    for edge in (lo, hi):
        mask.scatter_(-1, torch.where(edge >= 0, edge, nk).clamp_max(nk), True)
    mask = mask[..., :nk] & allowed
    # vertical columns outside the row's blocks, visible to at least one query of the row
    col_block = top_columns // block_size  # (B, Hkv, V)
    in_blocks = mask.gather(-1, col_block[:, :, None, :].expand(-1, -1, nq, -1))
    last_pos = ((qb + 1) * block_size - 1).clamp_max(lk - 1)  # (nQ, 1): newest position of each row
    visible = top_columns[:, :, None, :] <= last_pos.view(1, 1, nq, 1)
    extra = torch.where(~in_blocks & visible, top_columns[:, :, None, :], -1)
    return layout_from_block_mask(mask, block_size, first, extra_keys=extra)
