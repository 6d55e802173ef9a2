"""Sliding-window (+ sink tokens) softmax attention that only touches the keys it keeps.

Queries are processed in blocks; each block gathers the key range its window can reach plus the
sink keys, so the cost is O(Lq * (window + block + sinks)) instead of O(Lq * Lk). Same shape and
mask conventions as `reference.py`.
"""

from __future__ import annotations

import torch

from .reference import naive_attention, query_positions, window_mask


def _key_range(q_lo: int, q_hi: int, lk: int, window: int, causal: bool) -> tuple[int, int]:
    """[lo, hi): the window keys any query with position in [q_lo, q_hi] may see (sinks apart)."""
    lo = max(0, q_lo - window + 1)
    hi = q_hi + 1 if causal else q_hi + window
    return lo, min(lk, hi)


def _select_mask(mask: torch.Tensor | None, q_slice: slice, k_index: torch.Tensor) -> torch.Tensor | None:
    if mask is None:
        return None
    rows = mask if mask.shape[-2] == 1 else mask[..., q_slice, :]
    return rows.index_select(-1, k_index)


def sliding_window_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    window: int,
    sinks: int = 0,
    causal: bool = True,
    scaling: float | None = None,
    softcap: float | None = None,
    dropout: float = 0.0,
    training: bool = False,
    block_size: int = 64,
) -> torch.Tensor:
    lq, lk = query.shape[-2], key.shape[-2]
    device = query.device
    positions = query_positions(lq, lk, device) if causal else torch.arange(lq, device=device)
    b, hq, _, d = query.shape
    hkv = key.shape[1]
    groups = hq // hkv
    scaling = d ** -0.5 if scaling is None else scaling
    out = query.new_empty(b, hq, lq, value.shape[-1])
    for start in range(0, lq, block_size):
        stop = min(lq, start + block_size)
        q_pos = positions[start:stop]
        lo_key, hi_key = _key_range(int(q_pos[0]), int(q_pos[-1]), lk, window, causal)
        if sinks == 0 or lo_key <= sinks:  # one contiguous range of keys: views, no copies
            lo_key = 0 if sinks else lo_key
            k_index = torch.arange(lo_key, hi_key, device=device)
            k_blk, v_blk = key[..., lo_key:hi_key, :], value[..., lo_key:hi_key, :]
        else:
            k_index = torch.cat([torch.arange(sinks, device=device), torch.arange(lo_key, hi_key, device=device)])
            k_blk, v_blk = key.index_select(-2, k_index), value.index_select(-2, k_index)
        allowed = window_mask(stop - start, k_index.numel(), window, sinks, causal, device, q_pos=q_pos, k_pos=k_index)
        block_mask = _select_mask(mask, slice(start, stop), k_index)
        allowed = allowed if block_mask is None else block_mask & allowed
        q_blk = query[..., start:stop, :]
        if softcap is not None or (dropout and training):
            out[..., start:stop, :] = naive_attention(q_blk, k_blk, v_blk, allowed, scaling=scaling, softcap=softcap,
                                                      dropout=dropout, training=training)
            continue
        # each kv head's query group folded into the query dim: the keys are never repeated
        n = stop - start
        folded = q_blk.reshape(b, hkv, groups * n, d)
        if allowed.dim() == 2:  # (n, keys): every row and head alike, and every query sees itself
            attn_mask, visible = allowed.repeat(groups, 1), None
        else:  # (B|1, 1|Hq, n, keys) with the model's mask: padding rows may see nothing
            allowed = allowed.expand(allowed.shape[0], hq, n, allowed.shape[-1])
            visible = allowed.any(dim=-1, keepdim=True)
            attn_mask = (allowed | ~visible).reshape(allowed.shape[0], hkv, groups * n, allowed.shape[-1])
        block = torch.nn.functional.scaled_dot_product_attention(folded, k_blk, v_blk, attn_mask=attn_mask,
                                                                 scale=scaling).reshape(b, hq, n, -1)
        out[..., start:stop, :] = block if visible is None else block * visible.to(block.dtype)
    return out
