"""2-D patch-grid attention for ViT/CLIP/DiT: the tiled neighbourhood window against naive attention
under its boolean mask, the mask's definition, agent attention against its formula, models (full
window = dense, exact restore), grid inference and errors."""

import pytest
import tiny_models as tm
import torch

from attnpatch import PatchError, patch_model, patched_methods, unpatch_model
from attnpatch.config import parse_method_spec
from attnpatch.ops.block_sparse import block_sparse_attention, dense_mask
from attnpatch.ops.grid2d import (
    PatchGrid,
    agent_attention,
    neighbourhood_tiles,
    pool_agents,
    window_2d_attention,
    window_2d_mask,
)
from attnpatch.ops.reference import naive_attention
from attnpatch.ops.sparse_patterns import a_shape
from method_cases import MatrixCase, sparse_kernel_skipped_blocks

MATRIX_CASES = {"window_2d": MatrixCase(["vit"], {"tile": 2, "window_tiles": 1}, check=sparse_kernel_skipped_blocks),
                "agent": MatrixCase(["vit"], {"agent_grid": 2})}


def qkv(length, hq=4, hkv=4, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, hq, length, d, generator=g), torch.randn(2, hkv, length, d, generator=g),
            torch.randn(2, hkv, length, d, generator=g))


@pytest.mark.parametrize("shape,globals_,first,tile,window", [
    ((12, 12), 1, True, 4, 1),    # ViT-like: CLS first, tiles divide the grid
    ((12, 12), 1, True, 3, 3),
    ((8, 10), 5, False, 4, 2),    # non-square, text appended (SD3-like), partial border tiles
    ((7, 9), 0, True, 2, 3),      # DiT-like: patches only, odd sides
    ((6, 6), 20, True, 2, 1),     # more globals than a block
])
def test_window_2d_equals_naive_attention_under_its_mask(shape, globals_, first, tile, window):
    grid_ = PatchGrid(*shape, globals_, first)
    length = shape[0] * shape[1] + globals_
    q, k, v = qkv(length, hq=4, hkv=2)
    out = window_2d_attention(q, k, v, grid_, tile=tile, window_tiles=window, scaling=0.3)
    ref = naive_attention(q, k, v, window_2d_mask(grid_, tile, window), scaling=0.3)
    assert (out - ref).abs().max() <= 1e-5


def test_window_2d_with_a_model_mask():
    grid_ = PatchGrid(8, 8, 3, True)
    q, k, v = qkv(67)
    mask = torch.ones(2, 1, 67, 67, dtype=torch.bool)
    mask[0, ..., 1:3] = False  # two global keys of sequence 0 hidden
    mask[1, ..., 20] = False  # one patch key of sequence 1 hidden
    out = window_2d_attention(q, k, v, grid_, tile=4, window_tiles=1, scaling=0.3, mask=mask)
    ref = naive_attention(q, k, v, window_2d_mask(grid_, 4, 1) & mask, scaling=0.3)
    assert (out - ref).abs().max() <= 1e-5


def test_window_2d_mask_definition():
    """Neighbourhood attention at tile granularity: every tile sees the same number of tiles; an
    interior tile sees exactly the tiles within Chebyshev distance (w-1)/2; globals see and are seen
    by everything."""
    tiles = neighbourhood_tiles(6, 5, 3)
    assert torch.equal(tiles.sum(-1), torch.full((30,), 9))
    r, c = torch.meshgrid(torch.arange(6), torch.arange(5), indexing="ij")
    r, c = r.reshape(-1), c.reshape(-1)
    cheb = torch.maximum((r[:, None] - r[None, :]).abs(), (c[:, None] - c[None, :]).abs())
    interior = (r >= 1) & (r <= 4) & (c >= 1) & (c <= 3)
    assert torch.equal(tiles[interior], (cheb <= 1)[interior])
    corner = tiles[0].view(6, 5)  # shifted inward: rows 0-2, cols 0-2
    assert torch.equal(corner.nonzero().amax(0), torch.tensor([2, 2]))
    grid_ = PatchGrid(4, 4, 2, True)
    mask = window_2d_mask(grid_, 1, 3)
    assert mask[:2].all() and mask[:, :2].all()
    patch = lambda row, col: 2 + row * 4 + col  # noqa: E731
    assert mask[patch(1, 1), patch(2, 2)] and not mask[patch(1, 1), patch(3, 3)]
    assert mask[patch(0, 0), patch(2, 2)]  # the corner's window shifts inward to rows/cols 0-2
    assert int(mask[2:, 2:].sum(-1).unique().numel()) == 1  # every patch sees 9 patches


def test_bidirectional_template_hides_the_partial_last_block():
    """Encoder lengths that are not a block multiple use the shared template with the tail hidden."""
    q, k, v = qkv(37, hq=4, hkv=2)
    layout = a_shape(37, 37, 8, causal=False, sink_blocks=1, local_blocks=2)
    out = block_sparse_attention(q, k, v, layout, causal=False, scaling=0.3)
    ref = naive_attention(q, k, v, dense_mask(layout, 37, 37, False), scaling=0.3)
    assert (out - ref).abs().max() <= 1e-5


def test_agent_attention_follows_its_definition():
    grid_ = PatchGrid(5, 7, 1, True)
    q, k, v = qkv(36, hq=4, hkv=2)
    valid = torch.ones(2, 36, dtype=torch.bool)
    valid[1, 30:] = False
    agents = pool_agents(q, grid_, 3)
    # adaptive pooling by its definition: cell i spans floor(i*n/a) .. ceil((i+1)*n/a)
    patches = q[:, :, 1:].reshape(2, 4, 5, 7, 8)
    for i in range(3):
        for j in range(3):
            rows = slice(5 * i // 3, -(-5 * (i + 1) // 3))
            cols = slice(7 * j // 3, -(-7 * (j + 1) // 3))
            assert torch.allclose(agents[:, :, i * 3 + j], patches[:, :, rows, cols].mean(dim=(2, 3)), atol=1e-6)
    out = agent_attention(q, k, v, agents, scaling=0.3, key_valid=valid)
    kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    agent_scores = (agents @ kk.transpose(-1, -2) * 0.3).masked_fill(~valid[:, None, None, :], float("-inf"))
    agent_values = agent_scores.softmax(-1) @ vv
    ref = (q @ agents.transpose(-1, -2) * 0.3).softmax(-1) @ agent_values
    assert (out - ref).abs().max() <= 1e-5


FULL = {"window_2d": {"tile": 2, "window_tiles": 2}}  # 4x4 patch grids: 2x2 tiles, a 2-tile window is all
SPARSE = {"window_2d": {"tile": 2, "window_tiles": 1}, "agent": {"agent_grid": 2}}


@pytest.mark.parametrize("name", ["vit", "clip", "dit", "pixart", "sd3"])
def test_models_full_window_equals_dense_sparse_differs_restore_exact(name):
    model = tm.build(name)
    before = tm.run(name, model)
    patch_model(model, "window_2d", **FULL["window_2d"])
    assert (tm.run(name, model) - before).abs().max() <= 1e-5
    unpatch_model(model)
    for method, params in SPARSE.items():
        patch_model(model, method, **params)
        assert (tm.run(name, model) - before).abs().max() > 1e-3
        unpatch_model(model)
    assert torch.equal(tm.run(name, model), before)


def test_globals_position_is_inferred_per_model_kind():
    """ViT's CLS comes first, SD3's joint attention appends the text: 'auto' picks each."""
    for name, right, wrong in (("vit", "start", "end"), ("sd3", "end", "start")):
        model = tm.build(name)
        outs = {}
        for at in ("auto", right, wrong):
            patch_model(model, "window_2d", tile=2, window_tiles=1, globals_at=at)
            outs[at] = tm.run(name, model)
            unpatch_model(model)
        assert torch.equal(outs["auto"], outs[right])
        assert (outs["auto"] - outs[wrong]).abs().max() > 1e-3


def test_density_and_spec_parsing():
    model = tm.build("dit")
    patch_model(model, parse_method_spec("window_2d:tile=2,window_tiles=1,grid=4/4"))
    tm.run("dit", model)
    methods = patched_methods(model)
    assert len(methods) == 2 and all(m.last_density == pytest.approx(0.25) for m in methods)


def test_errors():
    with pytest.raises(PatchError, match="supports"):
        patch_model(tm.build("llama"), "window_2d")
    with pytest.raises(PatchError, match=r"grid must be \[height, width\]"):
        patch_model(tm.build("vit"), "window_2d", grid=[4, 4, 4])
    model = tm.build("vit")
    patch_model(model, "window_2d", grid=[5, 5])
    with pytest.raises(PatchError, match="does not fit"):
        tm.run("vit", model)
    with pytest.raises(PatchError, match="tile"):
        patch_model(tm.build("vit"), "window_2d", tile=0)
