"""Attention over a 2-D patch grid (ViT, CLIP vision, DiT): a tiled neighbourhood window computed
with the block-sparse kernel, and agent attention.

A sequence is `globals` tokens (CLS, registers, or a joint model's text) plus h x w patch tokens in
raster order, the globals either before or after the patches (`PatchGrid`). The window groups the
patches into square tiles of `tile` x `tile`; every query of a tile shares one neighbourhood of
window_tiles x window_tiles tiles, centred on its tile and shifted inward at the borders so every
tile sees the same number of keys (neighbourhood attention with the query stride equal to the tile,
as in generalised neighbourhood attention). Patches are reordered tile by tile, so a tile is one
contiguous key block and the window is a block layout; global tokens attend everything and are
attended by every query.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import PatchError
from .block_sparse import block_sparse_attention, grid
from .reference import naive_attention, repeat_kv
from .sparse_patterns import layout_from_block_mask


@dataclass(frozen=True)
class PatchGrid:
    """h x w patches in raster order plus `globals` other tokens before (or after) them."""

    height: int
    width: int
    globals: int
    globals_first: bool = True

    @classmethod
    def infer(cls, length: int, shape: list[int] | None = None, globals_first: bool = True) -> PatchGrid:
        """The grid of a `length`-token sequence: `shape` [h, w] if given, else the largest square
        that fits, the remaining tokens being globals (a ViT's CLS token and registers)."""
        if shape is None:
            side = math.isqrt(length)
            shape = [side, side]
        h, w = (int(v) for v in shape)
        if h < 1 or w < 1 or h * w > length:
            raise PatchError(f"patch grid {h}x{w} does not fit a sequence of {length} tokens; pass "
                             f"grid=[height, width] in patches (h*w <= sequence length)")
        return cls(h, w, length - h * w, globals_first)

    @property
    def patch_slice(self) -> slice:
        start = self.globals if self.globals_first else 0
        return slice(start, start + self.height * self.width)

    @property
    def global_index(self) -> torch.Tensor:
        n = self.height * self.width
        return torch.arange(self.globals) + (0 if self.globals_first else n)


def _tile_order(grid_: PatchGrid, tile: int) -> tuple[torch.Tensor, int, int]:
    """(order, tiles_h, tiles_w): raster patch index of each slot of the tile-by-tile order, with -1
    for the slots of partial border tiles that have no patch (the grid padded to whole tiles)."""
    th, tw = math.ceil(grid_.height / tile), math.ceil(grid_.width / tile)
    rows = torch.arange(th * tile).view(th, tile)[:, None, :, None].expand(th, tw, tile, tile)
    cols = torch.arange(tw * tile).view(tw, tile)[None, :, None, :].expand(th, tw, tile, tile)
    order = torch.where((rows < grid_.height) & (cols < grid_.width), rows * grid_.width + cols, -1)
    return order.reshape(-1), th, tw


def neighbourhood_tiles(tiles_h: int, tiles_w: int, window_tiles: int) -> torch.Tensor:
    """(T, T) boolean over tiles in row-major order: key tile inside the query tile's
    window_tiles x window_tiles neighbourhood (centred, shifted inward at the borders)."""

    def axis(n: int) -> torch.Tensor:  # (n, n): key index inside the query index's window
        span = min(window_tiles, n)
        start = (torch.arange(n) - (span - 1) // 2).clamp(0, n - span)
        k = torch.arange(n)
        return (k[None, :] >= start[:, None]) & (k[None, :] < start[:, None] + span)

    rows, cols = axis(tiles_h), axis(tiles_w)
    return (rows[:, None, :, None] & cols[None, :, None, :]).reshape(tiles_h * tiles_w, tiles_h * tiles_w)


def window_2d_mask(grid_: PatchGrid, tile: int, window_tiles: int) -> torch.Tensor:
    """(L, L) boolean in the original token order: what `window_2d_attention` lets each query see.
    The reference the kernel is tested against."""
    n = grid_.height * grid_.width
    length = n + grid_.globals
    patch_rows = torch.arange(grid_.height)[:, None].expand(-1, grid_.width).reshape(-1)
    patch_cols = torch.arange(grid_.width)[None, :].expand(grid_.height, -1).reshape(-1)
    tw = math.ceil(grid_.width / tile)
    tile_of = (patch_rows // tile) * tw + patch_cols // tile
    near = neighbourhood_tiles(math.ceil(grid_.height / tile), tw, window_tiles)
    mask = torch.ones(length, length, dtype=torch.bool)
    patches = torch.arange(length)[grid_.patch_slice]
    mask[patches[:, None], patches[None, :]] = near[tile_of[:, None], tile_of[None, :]]
    return mask


def window_2d_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, grid_: PatchGrid, *,
                        tile: int, window_tiles: int, scaling: float, mask: torch.Tensor | None = None,
                        softcap: float | None = None) -> torch.Tensor:
    """Tiled 2-D neighbourhood attention (see the module docstring). query/key/value (B, H, L, D)
    over the same L tokens; mask boolean broadcastable to (B, H, L, L) or None."""
    b, hq, length, d = query.shape
    order, th, tw = _tile_order(grid_, tile)
    offset = grid_.patch_slice.start
    globals_ = grid_.global_index.to(query.device)
    slots = torch.where(order >= 0, order + offset, 0).to(query.device)  # a padding slot borrows token 0
    # keys: the tiles in order, then the global tokens (one or more final key blocks every tile keeps)
    key_index = torch.cat([slots, globals_])
    real_key = torch.cat([order >= 0, torch.ones(grid_.globals, dtype=torch.bool)]).to(query.device)
    bs, n_tiles = tile * tile, th * tw
    nk = grid(n_tiles * bs, key_index.numel(), bs, False)[3]
    blocks = torch.zeros(n_tiles, nk, dtype=torch.bool)
    blocks[:, :n_tiles] = neighbourhood_tiles(th, tw, window_tiles)
    blocks[:, n_tiles:] = True
    layout = layout_from_block_mask(blocks.to(query.device), bs, 0)
    allowed = None
    if mask is not None or not bool(real_key.all()):
        allowed = real_key.view(1, 1, 1, -1)
        if mask is not None:
            rows = slots if mask.shape[-2] > 1 else torch.zeros(1, dtype=torch.long, device=query.device)
            allowed = allowed & mask[..., rows[:, None], key_index[None, :]]
    out = block_sparse_attention(query[:, :, slots], key[:, :, key_index], value[:, :, key_index], layout, allowed,
                                 causal=False, scaling=scaling, softcap=softcap)
    result = torch.empty_like(query)
    patch = order >= 0
    result[:, :, order[patch].to(query.device) + offset] = out[:, :, patch.to(query.device)]
    if grid_.globals:  # global queries attend every key, exactly
        g_mask = None if mask is None else mask[..., globals_, :] if mask.shape[-2] > 1 else mask
        result[:, :, globals_] = naive_attention(query[:, :, globals_], key, value, g_mask, scaling=scaling,
                                                 softcap=softcap).to(query.dtype)
    return result


def pool_agents(query: torch.Tensor, grid_: PatchGrid, agent_grid: int) -> torch.Tensor:
    """(B, H, A, D) agent tokens: the patch queries average-pooled over the 2-D grid to
    agent_grid x agent_grid cells (adaptive pooling: cell i spans rows floor(i*h/a)..ceil((i+1)*h/a))."""
    b, h, _, d = query.shape
    patches = query[:, :, grid_.patch_slice].transpose(-1, -2).reshape(b * h, d, grid_.height, grid_.width)
    pooled = torch.nn.functional.adaptive_avg_pool2d(patches.float(), agent_grid)
    return pooled.reshape(b, h, d, -1).transpose(-1, -2).to(query.dtype)


def agent_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, agents: torch.Tensor, *,
                    scaling: float, key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Agent attention: the agents attend every (valid) key, softmax(A K^T) V, and every query
    attends the agents, softmax(Q A^T) applied to those agent values. O(L * A * D) instead of
    O(L^2 * D). query (B, Hq, L, D), key/value (B, Hkv, L, D), agents (B, Hq, A, D), key_valid
    (B, L) boolean or None."""
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    agent_mask = None if key_valid is None else key_valid[:, None, None, :]
    agent_values = torch.nn.functional.scaled_dot_product_attention(agents, key, value, attn_mask=agent_mask,
                                                                    scale=scaling)
    return torch.nn.functional.scaled_dot_product_attention(query, agents, agent_values, scale=scaling)
