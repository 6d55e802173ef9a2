"""Sliding-window (+ sink tokens) softmax attention that only touches the keys it keeps.

Queries are processed in blocks; each block gathers the key range its window can reach plus the
sink keys, so the cost is O(Lq * (window + block + sinks)) instead of O(Lq * Lk). A causal prefill
without a mask (the long-input case) runs its full blocks all at once through overlapping views of
the keys; the rest goes block by block. Same shape and mask conventions as `reference.py`.
"""

from __future__ import annotations

import torch

from .reference import naive_attention, query_positions, repeat_kv, window_mask
from .segments import SEGMENT_BYTES, segment_bytes
from .work_count import record_work


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
    # written in the (B, L, H, D) layout the model wants, returned as a (B, H, L, D) view
    out = query.new_empty(b, lq, hq, value.shape[-1]).transpose(1, 2)
    done = range(0)
    if causal and lq == lk and mask is None and softcap is None and not (dropout and training):
        done = _prefill_full_blocks(query, key, value, out, window, sinks, scaling, block_size)
    for start in range(0, lq, block_size):
        if start in done:
            continue
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
        record_work(scores=b * hq * (stop - start) * k_index.numel())
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


def _prefill_full_blocks(query, key, value, out, window: int, sinks: int, scaling: float, block: int,
                         aligned: bool = False) -> range:
    """The causal prefill's blocks whose window span starts at or after the sinks, all at once, written
    into `out`; returns the query starts it covered. Query block c sees the keys of blocks c - reach .. c
    (the window's span, an overlapping view of the keys: no copy) plus the sinks, with one mask shared by
    every block; segments of blocks bound the memory. `aligned`: the window is `window // block` whole
    blocks (the diagonal one causal), as a block layout's local blocks are, not the nearest tokens."""
    b, hq, length, d = query.shape
    hkv, dv = key.shape[1], value.shape[-1]
    groups = hq // hkv
    reach = window // block - 1 if aligned else -(-(window - 1) // block)  # earlier blocks a window reaches into
    span = (reach + 1) * block
    first, stop = reach + -(-sinks // block), length // block  # spans clear of the sinks; full blocks only
    if stop - first < 2:
        return range(0)
    distance = reach * block + torch.arange(block, device=query.device)[:, None] - torch.arange(span, device=query.device)
    allowed = (distance >= 0) if aligned else (distance >= 0) & (distance < window)
    if sinks:  # sinks lie before every span here, so outside every window: each counted once
        allowed = torch.cat([allowed.new_ones(block, sinks), allowed], dim=-1)
    allowed = allowed.repeat(groups, 1)  # each kv head's query group folded into the query dim
    per_block = b * hq * block * (sinks + span) * query.element_size()
    step = max(1, segment_bytes(query.device, SEGMENT_BYTES) // per_block)
    out_layout = out.transpose(1, 2)  # (B, L, Hq, Dv)
    for c0 in range(first, stop, step):
        c1 = min(stop, c0 + step)
        n, lo = c1 - c0, (c0 - reach) * block
        spans = [t[:, :, lo:c1 * block].unfold(2, span, block).transpose(-1, -2) for t in (key, value)]
        if sinks:
            spans = [torch.cat([t[:, :, None, :sinks].expand(b, hkv, n, sinks, t.shape[-1]), s], dim=3)
                     for t, s in zip((key, value), spans)]
        k_s, v_s = (s.reshape(b * hkv, n, sinks + span, s.shape[-1]) for s in spans)
        q_s = query[:, :, c0 * block:c1 * block].reshape(b, hkv, groups, n, block, d).transpose(2, 3)
        q_s = q_s.reshape(b * hkv, n, groups * block, d)
        record_work(scores=b * hq * n * block * (sinks + span))
        result = torch.nn.functional.scaled_dot_product_attention(q_s, k_s, v_s, attn_mask=allowed, scale=scaling)
        result = result.view(b, hkv, n, groups, block, dv).permute(0, 2, 4, 1, 3, 5)
        out_layout[:, c0 * block:c1 * block].view(b, n, block, hkv, groups, dv).copy_(result)
    return range(first * block, stop * block, block)


def a_shape_prefill(query, key, value, *, sink_blocks: int, local_blocks: int, block: int, scaling: float):
    """A causal, unmasked prefill (queries = keys) of the a_shape block layout: each query block sees
    the first `sink_blocks` key blocks and its `local_blocks` nearest (the diagonal causal). Its full
    blocks clear of the sinks run as the sliding window's overlapping spans (no gathered copies); the
    blocks before them see one contiguous causal range, and a partial last block its own keys."""
    b, hq, length, d = query.shape
    groups = hq // key.shape[1]
    out = query.new_empty(b, length, hq, value.shape[-1]).transpose(1, 2)
    sinks = sink_blocks * block
    done = _prefill_full_blocks(query, key, value, out, local_blocks * block, sinks, scaling, block, aligned=True)
    head = done.start if len(done) else length  # the sinks and the local blocks overlap: plain causal
    rest = [(0, head)] + ([(done.stop, length)] if len(done) and done.stop < length else [])
    for lo, hi in rest:
        if hi <= lo:
            continue
        q_pos = torch.arange(lo, hi, device=query.device)
        lo_key = max(0, (lo // block - local_blocks + 1) * block)  # the first row's earliest local key
        k_pos = torch.arange(hi, device=query.device)
        if lo_key > sinks:  # a partial last block: its sinks and local blocks only
            k_pos = torch.cat([k_pos[:sinks], k_pos[lo_key:]])
        local = k_pos >= (q_pos[:, None] // block - local_blocks + 1) * block
        allowed = (k_pos <= q_pos[:, None]) & ((k_pos < sinks) | local)
        k, v = (repeat_kv(t.index_select(-2, k_pos), groups) for t in (key, value))
        record_work(scores=b * hq * (hi - lo) * k_pos.numel())
        out[..., lo:hi, :] = torch.nn.functional.scaled_dot_product_attention(
            query[..., lo:hi, :], k, v, attn_mask=allowed, scale=scaling)
    return out
