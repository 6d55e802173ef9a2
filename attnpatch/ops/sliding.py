"""Sliding-window (+ sink tokens) softmax attention that only touches the keys it keeps.

Queries are processed in blocks; each block gathers the key range its window can reach plus the
sink keys, so the cost is O(Lq * (window + block + sinks)) instead of O(Lq * Lk). Same shape and
mask conventions as `reference.py`.
"""

from __future__ import annotations

import torch

from .reference import naive_attention, query_positions, repeat_kv, window_mask


def _key_index(q_lo: int, q_hi: int, lk: int, window: int, sinks: int, causal: bool, device) -> torch.Tensor:
    """Keys any query with position in [q_lo, q_hi] may see: the sinks plus the window range."""
    lo = max(0, q_lo - window + 1)
    hi = q_hi + 1 if causal else q_hi + window
    hi = min(lk, hi)
    window_keys = torch.arange(lo, hi, device=device)
    sink_keys = torch.arange(0, min(sinks, lo), device=device)
    return torch.cat([sink_keys, window_keys])


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
    block_size: int = 128,
) -> torch.Tensor:
    lq, lk = query.shape[-2], key.shape[-2]
    device = query.device
    positions = query_positions(lq, lk, device) if causal else torch.arange(lq, device=device)
    groups = query.shape[1] // key.shape[1]
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    outputs = []
    for start in range(0, lq, block_size):
        stop = min(lq, start + block_size)
        q_pos = positions[start:stop]
        k_index = _key_index(int(q_pos[0]), int(q_pos[-1]), lk, window, sinks, causal, device)
        allowed = window_mask(stop - start, k_index.numel(), window, sinks, causal, device, q_pos=q_pos, k_pos=k_index)
        block_mask = _select_mask(mask, slice(start, stop), k_index)
        allowed = allowed if block_mask is None else block_mask & allowed
        k_blk = key.index_select(-2, k_index)
        v_blk = value.index_select(-2, k_index)
        q_blk = query[..., start:stop, :]
        if softcap is None:
            # SDPA on the gathered block; rows with no visible key (padding) come back as 0
            visible = allowed.any(dim=-1, keepdim=True)
            out = torch.nn.functional.scaled_dot_product_attention(
                q_blk,
                repeat_kv(k_blk, groups),
                repeat_kv(v_blk, groups),
                attn_mask=allowed | ~visible,
                dropout_p=dropout if training else 0.0,
                scale=scaling,
            )
            out = out * visible.to(out.dtype)
        else:
            out = naive_attention(
                q_blk, k_blk, v_blk, allowed, scaling=scaling, softcap=softcap, dropout=dropout, training=training
            )
        outputs.append(out)
    return torch.cat(outputs, dim=-2)
