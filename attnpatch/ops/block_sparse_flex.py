"""Block-sparse attention through PyTorch's FlexAttention: the same `BlockLayout` turned into a
FlexAttention `BlockMask`, so that on a GPU the fused kernel skips the unkept blocks.

Same contract as `block_sparse.block_sparse_attention` (absolute block alignment, bottom-right
causality, the model's boolean mask, softcap, rows with no visible key are 0). Single extra key
tokens (`extra_keys`, vertical_slash's columns) have no block-mask form: such layouts raise, and
the method's `auto` backend keeps them on the torch path. On CUDA the kernel runs compiled
(`torch.compile`, below); elsewhere FlexAttention runs eagerly, which is correct but slow: that is
for parity tests, not speed.

The compiled kernel walks each block in tiles of BLOCK_M queries x BLOCK_N keys that must divide the
block (its defaults, 128 x 64 in half precision, reject 64-token blocks: measured on an H200 with
torch 2.11): the tiles are chosen from the block size, and a block size with no tile of at least 16
(Triton's smallest matrix tile) cannot run compiled.

The compiled kernel is specialised to its shapes and to every Python number its mask reads (~10 s to
compile on an H200, and after 8 specialisations dynamo falls back to eager FlexAttention, which
materialises the L x L scores). So on CUDA the block grid is padded to a power of two of blocks
(padded query rows list no block and padded key blocks are never listed: no extra work) and the
lengths the mask needs travel as tensors: every length of a bucket shares one compiled kernel. Calls
with the model's own mask (padded batches) still specialise to its length.
"""

from __future__ import annotations

import functools

import torch

from .block_sparse import BlockLayout, layout_grid
from .work_count import counting, dense_block_pairs, record_work


def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


FLEX_MIN_TILE = 16
FLEX_MAX_TILE_M = {torch.float32: 64}  # the kernel's own defaults: 128 x 64, and 64 x 64 in float32
FLEX_MAX_TILE_N = 64


def flex_tile(block_size: int) -> int | None:
    """The largest power of two that divides block_size, or None below FLEX_MIN_TILE."""
    tile = block_size & -block_size
    return tile if tile >= FLEX_MIN_TILE else None


def flex_kernel_options(block_size: int, dtype: torch.dtype) -> dict:
    """BLOCK_M x BLOCK_N tiles that divide the layout's blocks (the compiled kernel's requirement)."""
    tile = flex_tile(block_size)
    if tile is None:
        raise ValueError(f"block_size={block_size} has no FlexAttention kernel tile (a power of two >= "
                         f"{FLEX_MIN_TILE} dividing it): use a block size such as 64 or 128, or backend='torch'")
    return {"BLOCK_M": min(tile, FLEX_MAX_TILE_M.get(dtype, 128)), "BLOCK_N": min(tile, FLEX_MAX_TILE_N)}


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def shape_bucket(blocks: int) -> int:
    """The smallest power of two >= blocks: the block counts the compiled kernel is specialised to."""
    return 1 << max(0, blocks - 1).bit_length()


def _kv_block_lists(layout: BlockLayout, batch: int, heads: int, groups: int):
    """kv_num_blocks (B, Hq, nQ) and kv_indices (B, Hq, nQ, nK) int32: each row's kept blocks, ascending."""
    blocks = layout.kv_blocks
    if blocks.shape[1] > 1:  # per kv head: each query head of a group uses its kv head's layout
        blocks = blocks.repeat_interleave(groups, dim=1)
    blocks = blocks.expand(batch, heads, *blocks.shape[2:])
    unused = torch.iinfo(blocks.dtype).max
    ordered = torch.where(blocks < 0, unused, blocks).sort(dim=-1).values
    counts = (ordered != unused).sum(-1).to(torch.int32)
    indices = torch.where(ordered == unused, 0, ordered).to(torch.int32)
    width = layout.num_key_blocks
    if indices.shape[-1] < width:
        indices = torch.nn.functional.pad(indices, (0, width - indices.shape[-1]))
    return counts.contiguous(), indices[..., :width].contiguous()


def _softcapped(softcap: float):
    def score_mod(score, batch, head, q_idx, kv_idx):
        return torch.tanh(score / softcap) * softcap
    return score_mod


def flex_block_sparse_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: BlockLayout,
                                mask: torch.Tensor | None = None, *, causal: bool, scaling: float,
                                softcap: float | None = None, bucket: bool | None = None) -> torch.Tensor:
    """query (B, Hq, Lq, D); key/value (B, Hkv, Lk, D); mask boolean broadcastable to (B, Hq|1, Lq, Lk).
    bucket: pad the block grid to powers of two (default: on CUDA, where the kernel is compiled)."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    if layout.extra_keys is not None and bool((layout.extra_keys >= 0).any()):
        raise ValueError("FlexAttention block masks cannot express single extra keys (extra_keys); "
                         "use the torch block-sparse path for this layout")
    b, hq, lq, d = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    groups, bs = hq // hkv, layout.block_size
    first, pad, nq, nk = layout_grid(layout, lq, lk, causal)
    bucket = query.is_cuda if bucket is None else bucket
    grid_q, grid_k = (shape_bucket(nq), shape_bucket(nk)) if bucket else (nq, nk)
    # queries padded at the front so that query block r starts at absolute block first + r; keys
    # padded to whole blocks, then both to the grid (the padding is masked below)
    q = torch.nn.functional.pad(query, (0, 0, pad, grid_q * bs - lq - pad))
    k = torch.nn.functional.pad(key, (0, 0, 0, grid_k * bs - lk))
    v = torch.nn.functional.pad(value, (0, 0, 0, grid_k * bs - lk))
    # as tensors, not Python numbers: a compiled kernel would be specialised to each value
    # (one copy to the device: each copy of a host number waits for it)
    key_length, offset, front, query_length = torch.tensor([lk, first * bs, pad, lq], device=query.device).unbind()
    if mask is not None:
        mask = mask.expand(mask.shape[0], mask.shape[1], lq, lk)
        per_batch, per_head = mask.shape[0] > 1, mask.shape[1] > 1

    counts, indices = _kv_block_lists(layout, b, hq, groups)
    counts = torch.nn.functional.pad(counts, (0, grid_q - nq))  # padded query rows: no block
    indices = torch.nn.functional.pad(indices, (0, grid_k - nk, 0, grid_q - nq))
    # the mask_mod is exact on its own (eager FlexAttention applies only it; kernels use the block
    # lists to skip blocks): the layout's blocks, causality, the key padding, the model's mask
    kept = torch.zeros(b, hq, grid_q, grid_k + 1, dtype=torch.bool, device=query.device)
    kept.scatter_(-1, torch.where(torch.arange(grid_k, device=query.device) < counts[..., None],
                                  indices.long(), grid_k), True)
    kept = kept[..., :grid_k]

    def mask_mod(batch, head, q_idx, kv_idx):
        keep = (kv_idx < key_length) & kept[batch, head, q_idx // bs, (kv_idx // bs).clamp(max=grid_k - 1)]
        if causal:
            keep = keep & (q_idx + offset >= kv_idx)
        if mask is not None:
            row = torch.minimum(torch.clamp(q_idx - front, min=0), query_length - 1)
            seen = mask[batch if per_batch else 0, head if per_head else 0, row, torch.minimum(kv_idx, key_length - 1)]
            keep = keep & seen
        return keep

    if counting():  # the blocks the kernel visits (its block lists), per kv head; bs x bs scores each
        visited = int(counts.sum())
        record_work(pairs=visited // groups, scores=visited * bs * bs,
                    dense_pairs=b * hkv * dense_block_pairs(first, nq, nk, causal))
    block_mask = BlockMask.from_kv_blocks(counts, indices, BLOCK_SIZE=bs, mask_mod=mask_mod,
                                          seq_lengths=(grid_q * bs, grid_k * bs))
    score_mod = None if softcap is None else _softcapped(softcap)
    if query.is_cuda:
        out = _compiled_flex()(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scaling,
                               enable_gqa=groups > 1, kernel_options=flex_kernel_options(bs, query.dtype))
    else:
        out = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scaling, enable_gqa=groups > 1)
    return out[:, :, pad:pad + lq]
