"""Block-sparse softmax attention that computes only the key blocks it keeps.

A `BlockLayout` says, for every query block and kv head, which key blocks (and optionally which
single extra key tokens) the block's queries may attend. `block_sparse_attention` gathers exactly
those keys for a chunk of query blocks at a time and runs softmax attention on them, so work and
memory scale with the kept keys, not with Lq x Lk.

Blocks are aligned to absolute positions: key block j holds keys [j*bs, (j+1)*bs); with causal
bottom-right alignment query i sits at position Lk - Lq + i and belongs to query block
position // bs, so the diagonal block of a query block has the same index. Layouts are per kv
head (one selection serves a GQA query group, which is what lets a group share the gathered
keys); a head dimension of 1 shares one layout across heads. Inside the kept keys, causality and
the model's own mask (padding, a model's sliding window) still apply exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .reference import causal_mask, naive_attention

# elements of one chunk's score tensor: bounds memory at long lengths (~64 MiB of float32 scores)
_CHUNK_ELEMENTS = 1 << 24


@dataclass
class BlockLayout:
    """kv_blocks (B|1, Hkv|1, nQ, K) absolute key-block indices, -1 = unused slot; rows hold no
    duplicates. extra_keys (B|1, Hkv|1, nQ, E) single key positions outside the row's blocks
    (-1 = unused), or None. Row r is absolute query block first_block + r."""

    kv_blocks: torch.Tensor
    block_size: int
    first_block: int
    num_key_blocks: int
    extra_keys: torch.Tensor | None = None

    @property
    def num_query_blocks(self) -> int:
        return self.kv_blocks.shape[-2]

    def kept_blocks(self) -> torch.Tensor:
        """(B|1, Hkv|1, nQ) number of key blocks each query block computes."""
        return (self.kv_blocks >= 0).sum(-1)

    def block_mask(self) -> torch.Tensor:
        """(B|1, Hkv|1, nQ, nK) boolean: key block kept for query block."""
        mask = torch.zeros(*self.kv_blocks.shape[:-1], self.num_key_blocks + 1, dtype=torch.bool,
                           device=self.kv_blocks.device)
        mask.scatter_(-1, torch.where(self.kv_blocks >= 0, self.kv_blocks, self.num_key_blocks), True)
        return mask[..., :-1]


def grid(lq: int, lk: int, block_size: int, causal: bool) -> tuple[int, int, int, int]:
    """(first_block, front padding of the queries, query blocks, key blocks) for a call."""
    start = lk - lq if causal else 0
    first, pad = divmod(start, block_size)
    return first, pad, math.ceil((lq + pad) / block_size), math.ceil(lk / block_size)


def query_block_positions(layout: BlockLayout, device) -> torch.Tensor:
    """(nQ, bs) absolute positions of each query block's rows (front padding included)."""
    bs = layout.block_size
    return (layout.first_block * bs + torch.arange(layout.num_query_blocks * bs, device=device)).view(-1, bs)


def dense_mask(layout: BlockLayout, lq: int, lk: int, causal: bool) -> torch.Tensor:
    """(B|1, Hkv|1, Lq, Lk) boolean mask equal to what the layout computes (with causality): the
    reference that block-sparse outputs are tested against."""
    bs = layout.block_size
    blocks = layout.block_mask()  # (b, h, nQ, nK)
    per_key = blocks.repeat_interleave(bs, dim=-1)[..., :lk]
    if layout.extra_keys is not None:
        extra = torch.zeros(*per_key.shape[:-1], lk + 1, dtype=torch.bool, device=per_key.device)
        extra = extra.expand(*torch.broadcast_shapes(extra.shape[:-2], layout.extra_keys.shape[:-2]),
                             *extra.shape[-2:]).clone()
        extra.scatter_(-1, torch.where(layout.extra_keys >= 0, layout.extra_keys, lk), True)
        per_key = per_key | extra[..., :lk]
    per_query = per_key.repeat_interleave(bs, dim=-2)
    pad = (lk - lq) % bs if causal else 0
    per_query = per_query[..., pad : pad + lq, :]
    if causal:
        per_query = per_query & causal_mask(lq, lk, per_query.device)
    return per_query


def _gather_index(layout: BlockLayout, rows: slice, lk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Key positions (b, h, c, M) for query blocks `rows`, and whether each slot is real."""
    bs = layout.block_size
    blocks = layout.kv_blocks[..., rows, :]
    index = (blocks.clamp_min(0)[..., None] * bs + torch.arange(bs, device=blocks.device)).flatten(-2)
    real = (blocks >= 0).repeat_interleave(bs, dim=-1) & (index < lk)
    if layout.extra_keys is not None:
        extra = layout.extra_keys[..., rows, :]
        shape = torch.broadcast_shapes(index.shape[:-1], extra.shape[:-1])
        index = torch.cat([index.expand(*shape, -1), extra.clamp_min(0).expand(*shape, -1)], dim=-1)
        real = torch.cat([real.expand(*shape, -1), (extra >= 0).expand(*shape, -1)], dim=-1)
    return index.clamp_max(lk - 1), real


def block_sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: BlockLayout,
    mask: torch.Tensor | None = None,
    *,
    causal: bool,
    scaling: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Softmax attention of each query over the keys its block keeps (and that causality and `mask`
    allow). query (B, Hq, Lq, D); key/value (B, Hkv, Lk, D); mask boolean broadcastable to
    (B, Hq|1, Lq, Lk) or None. Rows with no visible key return 0. Output (B, Hq, Lq, D)."""
    b, hq, lq, d = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    groups, bs = hq // hkv, layout.block_size
    first, pad, nq, _ = grid(lq, lk, bs, causal)
    if (first, nq) != (layout.first_block, layout.num_query_blocks):
        raise ValueError(f"layout covers query blocks {layout.first_block}..+{layout.num_query_blocks}, "
                         f"the call needs {first}..+{nq}")
    # queries grouped per kv head: (B, Hkv, nQ, groups * bs, D), padded at the front to the grid
    padded = torch.nn.functional.pad(query, (0, 0, pad, nq * bs - lq - pad))
    grouped = padded.view(b, hkv, groups, nq, bs, d).permute(0, 1, 3, 2, 4, 5).reshape(b, hkv, nq, groups * bs, d)
    q_pos = query_block_positions(layout, query.device)  # (nQ, bs)
    q_row = q_pos - (lk - lq if causal else 0)  # row of `query` each padded position is (may be < 0)
    row_ok = (q_row >= 0) & (q_row < lq)
    if mask is not None and mask.shape[1] not in (1, hkv):
        mask = mask.view(mask.shape[0], hkv, groups, *mask.shape[2:])[:, :, 0]  # layouts are per kv head
    width = layout.kv_blocks.shape[-1] * bs + (0 if layout.extra_keys is None else layout.extra_keys.shape[-1])
    step = max(1, _CHUNK_ELEMENTS // max(1, b * hq * bs * width))
    out = torch.empty(b, hkv, nq, groups * bs, d, dtype=query.dtype, device=query.device)
    batch_index = torch.arange(b, device=query.device).view(b, 1, 1, 1)
    head_index = torch.arange(hkv, device=query.device).view(1, hkv, 1, 1)
    for start in range(0, nq, step):
        rows = slice(start, min(nq, start + step))
        index, real = _gather_index(layout, rows, lk)  # (b|1, h|1, c, M)
        index = index.expand(b, hkv, *index.shape[2:])
        k_g, v_g = key[batch_index, head_index, index], value[batch_index, head_index, index]  # (B, Hkv, c, M, D)
        pos = q_pos[rows]  # (c, bs)
        allowed = real[..., None, :] & row_ok[rows][..., None]  # (b|1, h|1, c, bs, M)
        if causal:
            allowed = allowed & (index[..., None, :] <= pos[..., None])
        if mask is not None:
            q_index = q_row[rows].clamp(0, lq - 1)  # (c, bs)
            rows_mask = mask[:, :, q_index] if mask.shape[-2] > 1 else mask.expand(*mask.shape[:2], 1, 1, lk)
            m_index = index[:, :, :, None, :].expand(-1, -1, -1, bs, -1)
            rows_mask = rows_mask.expand(b, hkv, *rows_mask.shape[2:])
            allowed = allowed & torch.gather(rows_mask, -1, m_index)
        allowed = allowed.expand(b, hkv, *allowed.shape[2:])
        allowed = allowed[:, :, :, None].expand(-1, -1, -1, groups, -1, -1).flatten(3, 4)  # (B, Hkv, c, g*bs, M)
        q_c = grouped[:, :, rows]
        if softcap is None:
            visible = allowed.any(dim=-1, keepdim=True)
            o = torch.nn.functional.scaled_dot_product_attention(  # 4-D, as SDPA's fused CPU kernels want
                q_c.flatten(1, 2), k_g.flatten(1, 2), v_g.flatten(1, 2), attn_mask=(allowed | ~visible).flatten(1, 2),
                scale=scaling)
            out[:, :, rows] = o.view_as(q_c) * visible.to(o.dtype)
        else:
            out[:, :, rows] = naive_attention(q_c, k_g, v_g, allowed, scaling=scaling, softcap=softcap)
    out = out.view(b, hkv, nq, groups, bs, d).permute(0, 1, 3, 2, 4, 5).reshape(b, hq, nq * bs, d)
    return out[:, :, pad : pad + lq]
