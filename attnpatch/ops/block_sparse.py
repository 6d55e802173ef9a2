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

from .reference import causal_mask
from .work_count import dense_block_pairs, record_work

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

    def density(self, lk: int, causal: bool) -> float:
        """Computed key blocks / the blocks dense attention computes (causal: those at or below the
        diagonal), over all rows and heads; single extra keys count as a fraction of a block."""
        first, nq, nk = self.first_block, self.num_query_blocks, self.num_key_blocks
        rows = torch.arange(first, first + nq)
        admissible = float((rows + 1).clamp_max(nk).sum()) if causal else float(nq * nk)
        kept = self.kept_blocks().float().mean(dim=(0, 1)).sum()
        if self.extra_keys is not None:
            kept = kept + (self.extra_keys >= 0).float().mean(dim=(0, 1)).sum() / self.block_size
        return float(kept) / admissible

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


def layout_grid(layout: BlockLayout, lq: int, lk: int, causal: bool) -> tuple[int, int, int, int]:
    """`grid` of a call, checked against the layout made for it."""
    first, pad, nq, nk = grid(lq, lk, layout.block_size, causal)
    if (first, nq) != (layout.first_block, layout.num_query_blocks):
        raise ValueError(f"layout covers query blocks {layout.first_block}..+{layout.num_query_blocks}, "
                         f"the call needs {first}..+{nq}")
    return first, pad, nq, nk


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


def _items(layout: BlockLayout, b: int, hkv: int, lk: int, causal: bool, plain: bool):
    """Flatten the layout into items (one query block of one kv head of one sequence), with each
    item's number of kept blocks and its template kind: 0 = element mask needed, 1 = the shared
    template (everything visible but the future part of a causal diagonal block), 2 = the template
    with the padded tail of a partial last key block hidden (bidirectional). Templates need plain
    items: no extra keys, no model mask, and when causal the diagonal block last. Items are sorted
    so that chunks hold items of equal width and kind: no work is spent on padding slots."""
    blocks = layout.kv_blocks.expand(b, hkv, *layout.kv_blocks.shape[2:]).reshape(-1, layout.kv_blocks.shape[-1])
    # kept blocks first, ascending (unused slots last), whatever order the layout listed them in
    unused = torch.iinfo(blocks.dtype).max
    blocks = torch.where(blocks < 0, unused, blocks).sort(dim=-1).values
    blocks = torch.where(blocks == unused, -1, blocks)
    counts = (blocks >= 0).sum(-1)
    nq = layout.num_query_blocks
    kind = torch.zeros_like(counts)
    if plain and layout.extra_keys is None:
        last = blocks.gather(-1, (counts - 1).clamp_min(0)[:, None])[:, 0]
        if causal:  # the diagonal block is the last kept one
            diagonal = torch.arange(layout.first_block, layout.first_block + nq, device=blocks.device).repeat(b * hkv)
            kind = ((last == diagonal) & (counts > 0)).long()
        else:  # bidirectional: every kept key is visible, but for a partial last block's padding
            partial_tail = (lk % layout.block_size != 0) & (last == layout.num_key_blocks - 1)
            kind = torch.where(counts > 0, 1 + partial_tail.long(), 0)
    order = torch.argsort(counts * 3 + kind, stable=True)
    return blocks, counts, kind, order


def _template(width: int, groups: int, bs: int, causal: bool, tail: int, dtype, device) -> torch.Tensor:
    """(groups * bs, width * bs) additive mask shared by template items: everything visible except
    the future part of the diagonal (last) block when causal, and the last `tail` key slots
    (padding past the final key) otherwise."""
    mask = torch.zeros(groups * bs, width * bs, dtype=dtype, device=device)
    if causal:
        future = torch.ones(bs, bs, dtype=torch.bool, device=device).triu(1).repeat(groups, 1)
        mask[:, (width - 1) * bs :].masked_fill_(future, float("-inf"))
    elif tail:
        mask[:, width * bs - tail :] = float("-inf")
    return mask


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
    (B, Hq|1, Lq, Lk) or None. Rows with no visible key return 0. Output (B, Hq, Lq, D).

    Work is split into items (a query block of one kv head and sequence, with its query group),
    processed in chunks of items that keep the same number of blocks. Items whose blocks are
    plain (no model mask, no single extra keys, diagonal block last) share one small mask; the
    others get an element-wise mask built from positions and the model's mask."""
    b, hq, lq, d = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    groups, bs = hq // hkv, layout.block_size
    first, pad, nq, _ = layout_grid(layout, lq, lk, causal)
    device = query.device
    # queries on the block grid (padded at the front and back when the call does not fill it), seen as
    # (B, Hkv, G, nQ, bs, D): each item gathers its query group's block in one copy
    if pad or nq * bs != lq:
        query = torch.nn.functional.pad(query, (0, 0, pad, nq * bs - lq - pad))
    query_blocks = query.view(b, hkv, groups, nq, bs, d)
    keys, values = key.reshape(b * hkv, lk, d), value.reshape(b * hkv, lk, d)
    # whole blocks are gathered at once (rows of bs * D contiguous values): the keys fill the block grid
    nk = layout.num_key_blocks
    key_rows, value_rows = (torch.nn.functional.pad(t, (0, 0, 0, nk * bs - lk)) if nk * bs != lk else t.contiguous()
                            for t in (keys, values))
    key_rows, value_rows = key_rows.view(b * hkv * nk, bs * d), value_rows.view(b * hkv * nk, bs * d)
    q_pos = query_block_positions(layout, device)  # (nQ, bs)
    q_row = q_pos - (lk - lq if causal else 0)  # row of `query` each padded position is (may be < 0)
    if mask is not None and mask.shape[1] not in (1, hkv):
        mask = mask.view(mask.shape[0], hkv, groups, *mask.shape[2:])[:, :, 0]  # layouts are per kv head
    blocks, counts, kinds, order = _items(layout, b, hkv, lk, causal, mask is None)
    extra = None
    if layout.extra_keys is not None:
        extra = layout.extra_keys.expand(b, hkv, *layout.extra_keys.shape[2:]).reshape(-1, layout.extra_keys.shape[-1])
    # written in the (B, L, Hq, D) layout the model wants, so no transpose copy follows
    out = torch.empty(b, nq, bs, hkv, groups, d, dtype=query.dtype, device=device)
    offsets = torch.arange(bs, device=device)
    order_list = order.tolist()
    counts_sorted, kinds_sorted = counts[order].tolist(), kinds[order].tolist()
    # without autograd the gathered keys and values go to two buffers reused by every chunk: fresh
    # tensors of this size come back as new pages each chunk (gathers measured ~3x slower)
    reuse = not (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad))
    n_extra = 0 if extra is None else extra.shape[-1]

    def chunk_items(width: int) -> int:  # items per chunk: bounds the chunk's scores at _CHUNK_ELEMENTS
        return max(1, _CHUNK_ELEMENTS // max(1, groups * bs * (width * bs + n_extra)))

    buffers = None
    gathered = scores = 0  # key blocks gathered and attended, summed over items, and their score elements
    start = 0
    while start < len(order):
        width, kind = counts_sorted[start], kinds_sorted[start]
        step = chunk_items(width)
        stop = start
        s_h, first_row = divmod(order_list[start], nq)
        # the sort is stable, so a chunk's items ascend; consecutive query blocks of one sequence and kv
        # head (the common case at long lengths) are read and written as slices, so a chunk of 8 items or
        # more ends where the next sequence or head begins (smaller ones go on: fewer calls)
        while stop < len(order) and stop - start < step and counts_sorted[stop] == width \
                and kinds_sorted[stop] == kind and (stop - start < 8 or order_list[stop] // nq == s_h):
            stop += 1
        items = order[start:stop]
        n = stop - start
        run = order_list[stop - 1] - order_list[start] == n - 1 and first_row + n <= nq
        start = stop
        seq_head = items // nq  # index into keys / values (B*Hkv)
        if run:  # out[...] is (n, bs, G, D)
            targets = (s_h // hkv, slice(first_row, first_row + n), slice(None), s_h % hkv)
        else:
            targets = (seq_head // hkv, items % nq, slice(None), seq_head % hkv)
        if width == 0 and n_extra == 0:
            out[targets] = 0  # nothing kept
            continue
        kept = blocks[items, :width]  # (n, width), all >= 0
        rows = (seq_head[:, None] * nk + kept).flatten()
        gathered += len(rows)
        scores += n * groups * bs * (width * bs + n_extra)
        if reuse:
            if buffers is None:
                size = max(min(chunk_items(w), len(order)) * w for w in set(counts_sorted))
                buffers = key_rows.new_empty(2, size, bs * d)
            k_g = torch.index_select(key_rows, 0, rows, out=buffers[0, : len(rows)]).view(n, width * bs, d)
            v_g = torch.index_select(value_rows, 0, rows, out=buffers[1, : len(rows)]).view(n, width * bs, d)
        else:
            k_g = key_rows.index_select(0, rows).view(n, width * bs, d)
            v_g = value_rows.index_select(0, rows).view(n, width * bs, d)
        index = (kept[:, :, None] * bs + offsets).flatten(1)  # (n, width*bs) key positions
        if extra is not None:
            singles = extra[items].clamp(0, lk - 1)
            k_g = torch.cat([k_g, keys[seq_head[:, None], singles]], dim=1)
            v_g = torch.cat([v_g, values[seq_head[:, None], singles]], dim=1)
            index = torch.cat([index, extra[items]], dim=-1)
        real = (index >= 0) & (index < lk)  # unused extra slots; keys past lk in a partial last block
        index = index.clamp(0, lk - 1)
        if run:
            q_c = query_blocks[targets[0], targets[3], :, targets[1]].transpose(0, 1).reshape(n, groups * bs, d)
        else:
            q_c = query_blocks[targets[0], targets[3], :, targets[1]].reshape(n, groups * bs, d)
        if kind:
            tail = nk * bs - lk if kind == 2 else 0
            additive = _template(width, groups, bs, causal, tail, q_c.dtype, device)
            o = _attend(q_c, k_g, v_g, additive, scaling, softcap)
        else:
            allowed = real[:, None, :]  # (n, 1, M)
            pos = q_pos[items % nq]  # (n, bs)
            if causal:
                allowed = allowed & (index[:, None, :] <= pos[:, :, None])  # (n, bs, M)
            if mask is not None:
                rows = q_row[items % nq].clamp(0, lq - 1)  # (n, bs)
                sequence = (seq_head // hkv) if mask.shape[0] > 1 else torch.zeros_like(seq_head)
                heads = (seq_head % hkv) if mask.shape[1] > 1 else torch.zeros_like(seq_head)
                m_rows = rows if mask.shape[2] > 1 else torch.zeros_like(rows)
                allowed = allowed & mask[sequence[:, None, None], heads[:, None, None], m_rows[:, :, None],
                                         index[:, None, :]]
            allowed = allowed.expand(-1, bs, -1).repeat(1, groups, 1)  # (n, g*bs, M)
            visible = allowed.any(dim=-1, keepdim=True)
            additive = torch.zeros(allowed.shape, dtype=q_c.dtype, device=device).masked_fill_(
                ~allowed, float("-inf")).masked_fill_(~visible, 0.0)
            o = _attend(q_c, k_g, v_g, additive, scaling, softcap) * visible.to(q_c.dtype)
        out[targets] = o.view(n, groups, bs, d).transpose(1, 2)
    record_work(pairs=gathered, scores=scores, dense_pairs=b * hkv * dense_block_pairs(first, nq, nk, causal))
    out = out.view(b, nq * bs, hq, d)[:, pad : pad + lq]
    return out.transpose(1, 2)


def _attend(q, k, v, additive, scaling, softcap):
    """softmax(q k^T * scaling [softcapped] + additive) v for (n, Lq, D) x (n, M, D) items."""
    if softcap is None:
        return torch.nn.functional.scaled_dot_product_attention(  # 4-D, as SDPA's fused CPU kernels want
            q[None], k[None], v[None], attn_mask=additive if additive.dim() == 2 else additive[None],
            scale=scaling)[0]
    scores = torch.tanh(torch.matmul(q, k.transpose(-1, -2)) * (scaling / softcap)) * softcap + additive
    return torch.matmul(torch.softmax(scores.float(), dim=-1).to(q.dtype), v)
