"""Block-sparse attention: the kernel against naive attention under the layout's boolean mask,
every pattern's definition, full budgets equal dense, models (decoders with padding, encoders),
decoding through a dense cache, and clear errors."""

import shutil

import pytest
import tiny_models as tm
import torch

from attnpatch import PatchError, patch_model, unpatch_model
from attnpatch.ops.block_sparse import block_sparse_attention, dense_mask
from attnpatch.ops.reference import causal_mask, naive_attention, repeat_kv
from attnpatch.ops.block_selection import block_scores, block_topk
from attnpatch.ops.sparse_patterns import (
    a_shape,
    bigbird,
    layout_from_block_mask,
    star,
    vertical_slash,
)
from method_cases import MatrixCase, sparse_kernel_skipped_blocks

MATRIX_CASES = {name: MatrixCase(models, params, check=sparse_kernel_skipped_blocks) for name, (models, params) in {
    "sliding_window": (["llama", "vit"], {"window": 5, "sinks": 1, "block_size": 4}),
    "a_shape": (["llama", "vit"], {"block_size": 4, "local_blocks": 1}),
    "bigbird": (["llama", "vit"], {"block_size": 4, "window_blocks": 0, "random_blocks": 1}),
    "block_topk": (["llama", "vit"], {"block_size": 4, "top_k": 1}),
    "star": (["llama", "vit"], {"block_size": 4, "context_blocks": 1, "anchor_blocks": 0, "query_tokens": 1}),
    "vertical_slash": (["llama"], {"block_size": 4, "vertical": 2, "slash": 2, "last_q": 4}),
}.items()}

B, HQ, HKV, D = 2, 4, 2, 8


def qkv(lq, lk, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, HQ, lq, D, generator=g), torch.randn(B, HKV, lk, D, generator=g),
            torch.randn(B, HKV, lk, D, generator=g))


def padding_mask(lq, lk, pad=5):
    """(B, 1, Lq, Lk) model mask: sequence 0 left-padded by `pad` keys."""
    mask = torch.ones(B, 1, lq, lk, dtype=torch.bool)
    mask[0, :, :, :pad] = False
    return mask


def literal_mask(blocks, bs, first, lq, lk, causal, extra=None):
    """(B, Hkv, Lq, Lk): query i may see key j when j's block is kept for i's block (or j is one of its
    block's extra keys) and, causal, j is not after i. Written element by element from the boolean block
    table, independently of the library's layout code."""
    allowed = torch.zeros(B, HKV, lq, lk, dtype=torch.bool)
    offset = lk - lq if causal else 0
    for b in range(B):
        for h in range(HKV):
            for i in range(lq):
                row = (offset + i) // bs - first
                for j in range(lk):
                    kept = bool(blocks[b, h, row, j // bs]) or (extra is not None and j in extra[b, h, row].tolist())
                    allowed[b, h, i, j] = kept and (not causal or j <= offset + i)
    return allowed


def check(q, k, v, layout, causal, mask=None, softcap=None, tol=1e-5, blocks=None, extra=None):
    """Kernel output equals naive attention under (layout mask & model mask), on rows with a key; the
    layout mask is written literally from `blocks` when given, else read from the layout."""
    lq, lk = q.shape[-2], k.shape[-2]
    if blocks is not None:
        allowed = literal_mask(blocks, layout.block_size, layout.first_block, lq, lk, causal, extra)
        assert torch.equal(allowed, dense_mask(layout, lq, lk, causal).expand(B, HKV, lq, lk))
    else:
        allowed = dense_mask(layout, lq, lk, causal)  # (b|1, Hkv|1, Lq, Lk)
    allowed = repeat_kv(allowed.expand(B, HKV, lq, lk), HQ // HKV) if allowed.shape[1] > 1 else allowed
    if mask is not None:
        allowed = allowed & mask
    ref = naive_attention(q, k, v, allowed, scaling=D**-0.5, softcap=softcap)
    out = block_sparse_attention(q, k, v, layout, mask, causal=causal, scaling=D**-0.5, softcap=softcap)
    assert out.shape == q.shape
    assert (out - ref).abs().max() <= tol
    return allowed


@pytest.mark.parametrize("causal,lq,lk,bs", [(True, 37, 37, 8), (True, 11, 37, 8), (False, 37, 37, 8),
                                             (True, 64, 64, 16), (False, 20, 20, 7)])
@pytest.mark.parametrize("padded", [False, True])
def test_kernel_equals_naive_under_random_layouts(causal, lq, lk, bs, padded):
    q, k, v = qkv(lq, lk)
    first = (lk - lq) // bs if causal else 0
    nq = -(-(lq + ((lk - lq) % bs if causal else 0)) // bs)
    nk = -(-lk // bs)
    g = torch.Generator().manual_seed(1)
    blocks = torch.rand(B, HKV, nq, nk, generator=g) < 0.5
    layout = layout_from_block_mask(blocks, bs, first)
    check(q, k, v, layout, causal, padding_mask(lq, lk) if padded else None, blocks=blocks)
    # single extra keys (vertical columns) disjoint from the blocks
    extra = torch.randint(0, lk, (B, HKV, nq, 3), generator=g)
    extra = torch.where(blocks.gather(-1, extra // bs), -1, extra)
    extra[..., 1:] = torch.where(extra[..., 1:] == extra[..., :1], -1, extra[..., 1:])
    extra[..., 2] = torch.where(extra[..., 2] == extra[..., 1], -1, extra[..., 2])
    layout = layout_from_block_mask(blocks, bs, first, extra_keys=extra)
    check(q, k, v, layout, causal, padding_mask(lq, lk) if padded else None, softcap=2.0 if padded else None,
          blocks=blocks, extra=extra)


@pytest.mark.parametrize("backend", ["torch", "flex"])
@pytest.mark.parametrize("causal,lq,lk,bs", [(True, 64, 64, 8), (True, 24, 64, 8), (False, 40, 40, 8)])
def test_kernels_compute_only_the_kept_blocks(backend, causal, lq, lk, bs):
    """Work skipped is counted by the kernel itself (key blocks it gathers / visits per kv head and
    sequence): exactly the kept blocks, i.e. density x what dense attention computes; all blocks kept
    counts every admissible block."""
    from attnpatch.ops.block_sparse_flex import flex_block_sparse_attention
    from attnpatch.ops.work_count import count_computed_blocks

    kernel = block_sparse_attention if backend == "torch" else flex_block_sparse_attention
    q, k, v = qkv(lq, lk)
    first = (lk - lq) // bs if causal else 0
    nq, nk = -(-lq // bs), -(-lk // bs)
    admissible = torch.ones(nq, nk, dtype=torch.bool)  # dense: every block (causal: at or below the diagonal)
    if causal:
        admissible = torch.arange(nk)[None, :] <= (first + torch.arange(nq))[:, None]
    g = torch.Generator().manual_seed(4)
    for share in (0.3, 1.0):
        blocks = (torch.rand(B, HKV, nq, nk, generator=g) < share) & admissible
        layout = layout_from_block_mask(blocks, bs, first)
        with count_computed_blocks() as computed:
            kernel(q, k, v, layout, None, causal=causal, scaling=D**-0.5)
        assert computed.calls == 1 and computed.pairs == int(blocks.sum())
        assert computed.scores == computed.pairs * HQ // HKV * bs * bs  # bs x bs scores per pair and query head
        dense = B * HKV * int(admissible.sum())
        assert computed.dense_pairs == dense
        assert computed.pairs / dense == pytest.approx(layout.density(lk, causal), abs=1e-9)
        assert (computed.pairs < 0.45 * dense) if share < 1 else computed.pairs == dense


@pytest.mark.parametrize("causal,lq,lk,bs", [(True, 37, 37, 8), (True, 11, 37, 8), (False, 20, 20, 7),
                                             (True, 64, 64, 16), (True, 45, 83, 8)])
@pytest.mark.parametrize("padded", [False, True])
def test_flex_backend_equals_the_torch_kernel(causal, lq, lk, bs, padded):
    """The FlexAttention path (BlockMask from the same layout) against the torch kernel, which the
    test above holds to naive attention: random layouts, left padding, chunked queries, softcap,
    rows with no visible key (0 in both)."""
    from attnpatch.ops.block_sparse_flex import flex_block_sparse_attention

    q, k, v = qkv(lq, lk, seed=3)
    first = (lk - lq) // bs if causal else 0
    nq = -(-(lq + ((lk - lq) % bs if causal else 0)) // bs)
    nk = -(-lk // bs)
    blocks = torch.rand(B, HKV, nq, nk, generator=torch.Generator().manual_seed(2)) < 0.5
    layout = layout_from_block_mask(blocks, bs, first)
    mask = padding_mask(lq, lk) if padded else None
    for softcap, bucket in ((None, False), (2.0, False), (None, True), (2.0, True)):
        # bucket: the grid padded to powers of two of blocks, as on CUDA (one compiled kernel per bucket)
        expected = block_sparse_attention(q, k, v, layout, mask, causal=causal, scaling=D**-0.5, softcap=softcap)
        got = flex_block_sparse_attention(q, k, v, layout, mask, causal=causal, scaling=D**-0.5, softcap=softcap,
                                          bucket=bucket)
        assert (got - expected).abs().max() <= 1e-5, (softcap, bucket, (got - expected).abs().max())
    extra = torch.full((B, HKV, nq, 1), 0)
    with pytest.raises(ValueError, match="extra keys"):
        flex_block_sparse_attention(q, k, v, layout_from_block_mask(blocks, bs, first, extra_keys=extra), mask,
                                    causal=causal, scaling=D**-0.5)


@pytest.mark.parametrize("method", ["block_topk", "a_shape", "bigbird"])
def test_flex_backend_on_a_model(method):
    """backend='flex' runs FlexAttention (recorded per call) and gives the torch kernel's logits on a
    left-padded batch; vertical_slash (single extra keys) refuses it by name."""
    from attnpatch import patched_methods

    model = tm.build("llama")
    ids, mask = tm.text_batch(length=40, left_pad=3)
    params = {"block_topk": {"top_k": 1}, "a_shape": {"local_blocks": 1}, "bigbird": {"random_blocks": 1}}[method]
    outputs = {}
    for backend in ("torch", "flex"):
        patch_model(model, method, block_size=8, backend=backend, **params)
        with torch.no_grad():
            outputs[backend] = model(input_ids=ids, attention_mask=mask).logits
        assert {m.last_backend for m in patched_methods(model)} == {backend}
        unpatch_model(model)
    real = mask.bool()
    assert (outputs["flex"][real] - outputs["torch"][real]).abs().max() <= 1e-4
    with pytest.raises(PatchError, match="FlexAttention"):
        patch_model(model, "vertical_slash", backend="flex")


@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_flex_compiles_once_per_bucket(monkeypatch):
    """On CUDA FlexAttention is compiled and specialised to its shapes: one compile per bucket of block
    counts, not per prompt length (measured here on CPU, where dynamo's guards are the same: 300, 330
    and 360 tokens in 16-token blocks share one graph; unbucketed, each length compiled its own)."""
    import torch.nn.attention.flex_attention as flex_module
    from torch._dynamo.utils import counters

    from attnpatch.ops.block_sparse_flex import flex_block_sparse_attention
    from attnpatch.ops.sparse_patterns import a_shape

    torch._dynamo.reset()
    monkeypatch.setattr(flex_module, "flex_attention", torch.compile(flex_module.flex_attention, dynamic=False))
    try:
        graphs = []
        for length in (300, 330, 360):
            q, k, v = (torch.randn(1, h, length, 16, generator=torch.Generator().manual_seed(length)) for h in (4, 2, 2))
            layout = a_shape(length, length, 16, causal=True, sink_blocks=1, local_blocks=2, device=q.device)
            got = flex_block_sparse_attention(q, k, v, layout, causal=True, scaling=0.25, bucket=True)
            expected = block_sparse_attention(q, k, v, layout, causal=True, scaling=0.25)
            assert (got - expected).abs().max() <= 1e-5
            graphs.append(counters["stats"]["unique_graphs"])
        assert graphs[0] >= 1 and graphs[1] == graphs[0] and graphs[2] == graphs[0], graphs
    finally:
        torch._dynamo.reset()


def test_flex_shape_buckets():
    from attnpatch.ops.block_sparse_flex import shape_bucket

    assert [shape_bucket(n) for n in (1, 2, 3, 4, 5, 255, 256, 257, 2048)] == [1, 2, 4, 4, 8, 256, 256, 512, 2048]


def test_flex_kernel_tiles_divide_the_blocks_and_auto_avoids_blocks_without_one():
    """The compiled kernel's BLOCK_M x BLOCK_N tiles must divide the block (its 128 x 64 default failed
    on 64-token blocks on an H200): tiles follow the block size, a block size with no tile of >= 16
    raises by name, and `auto` keeps such blocks on the torch kernel even on a GPU."""
    from types import SimpleNamespace

    from attnpatch import patched_methods
    from attnpatch.ops.block_sparse_flex import flex_kernel_options

    assert flex_kernel_options(64, torch.bfloat16) == {"BLOCK_M": 64, "BLOCK_N": 64}
    assert flex_kernel_options(128, torch.bfloat16) == {"BLOCK_M": 128, "BLOCK_N": 64}
    assert flex_kernel_options(128, torch.float32) == {"BLOCK_M": 64, "BLOCK_N": 64}
    assert flex_kernel_options(48, torch.float16) == {"BLOCK_M": 16, "BLOCK_N": 16}
    with pytest.raises(ValueError, match="block_size=8 has no FlexAttention kernel tile"):
        flex_kernel_options(8, torch.bfloat16)
    on_gpu = SimpleNamespace(query=SimpleNamespace(is_cuda=True))
    model = tm.build("llama")
    for block_size, expected in ((8, False), (24, False), (32, True), (64, True)):
        patch_model(model, "block_topk", block_size=block_size)
        assert patched_methods(model)[0].uses_flex(on_gpu) is expected, block_size
        unpatch_model(model)


def test_a_shape_plain_prefill_takes_the_span_path_unless_flex_is_named(monkeypatch):
    """`auto` runs a plain causal prefill through the overlapping key spans on every device (on an H200
    they beat FlexAttention at 8k-128k); only backend='flex' sends it to FlexAttention."""
    import attnpatch.methods.sparse.a_shape as a_shape_module
    from attnpatch import patched_methods

    calls = []
    span_path = a_shape_module.a_shape_prefill
    monkeypatch.setattr(a_shape_module, "a_shape_prefill", lambda *a, **k: calls.append(1) or span_path(*a, **k))
    model = tm.build("llama")
    ids = torch.randint(3, tm.V - 2, (1, 48), generator=torch.Generator().manual_seed(0))
    for backend, expected_calls in (("auto", model.config.num_hidden_layers), ("flex", 0)):
        calls.clear()
        patch_model(model, "a_shape", block_size=8, local_blocks=2, backend=backend)
        with torch.no_grad():
            model(input_ids=ids)
        assert len(calls) == expected_calls, backend
        assert {m.last_backend for m in patched_methods(model)} == {"torch" if backend == "auto" else "flex"}
        unpatch_model(model)


def test_every_block_kept_is_dense_attention():
    q, k, v = qkv(50, 50)
    for causal in (True, False):
        layout = layout_from_block_mask(torch.ones(1, 1, 7, 7, dtype=torch.bool), 8, 0)
        out = block_sparse_attention(q, k, v, layout, causal=causal, scaling=D**-0.5)
        assert torch.allclose(out, naive_attention(q, k, v, causal=causal, scaling=D**-0.5), atol=1e-5)


@pytest.mark.parametrize("length", [5, 40, 70, 131])
@pytest.mark.parametrize("sink_blocks,local_blocks", [(0, 1), (1, 2), (2, 4), (1, 100)])
def test_a_shape_prefill_spans_equal_the_block_kernel(length, sink_blocks, local_blocks):
    """The plain causal prefill's path (overlapping key spans, no gathered blocks; the head and a
    partial last block on their own) against the block-sparse kernel on the same layout."""
    from attnpatch.ops.sliding import a_shape_prefill

    q, k, v = qkv(length, length)
    layout = a_shape(length, length, 8, causal=True, sink_blocks=sink_blocks, local_blocks=local_blocks)
    want = block_sparse_attention(q, k, v, layout, None, causal=True, scaling=D**-0.5)
    got = a_shape_prefill(q, k, v, sink_blocks=sink_blocks, local_blocks=local_blocks, block=8, scaling=D**-0.5)
    assert (got - want).abs().max() <= 1e-5
    assert got.stride(1) == D  # the (B, L, H, D) layout the model wants


def test_a_shape_model_prefill_takes_the_span_path(monkeypatch):
    """Unpadded prefills run the span path (counted; a left-padded batch too, one row at a time on its
    real tokens) and give the block kernel's logits."""
    import attnpatch.methods.sparse.a_shape as a_shape_method
    from attnpatch import patched_methods
    from attnpatch.methods.sparse.base import BlockSparseMethod

    calls = []
    original = a_shape_method.a_shape_prefill
    monkeypatch.setattr(a_shape_method, "a_shape_prefill", lambda *a, **k: calls.append(1) or original(*a, **k))
    model = tm.build("llama")
    patch_model(model, "a_shape", block_size=4, local_blocks=2)
    ids, mask = tm.text_batch(length=30, left_pad=3)
    with torch.no_grad():
        spans = [model(input_ids=ids).logits, model(input_ids=ids, attention_mask=mask).logits]
        assert len(calls) == 3 * model.config.num_hidden_layers  # the batch, then each padded row alone
        assert all(0 < m.last_density < 1 for m in patched_methods(model))
        monkeypatch.setattr(a_shape_method.AShapeAttention, "attention", BlockSparseMethod.attention)
        blocks = [model(input_ids=ids).logits, model(input_ids=ids, attention_mask=mask).logits]
    real = mask.bool()
    assert (spans[0] - blocks[0]).abs().max() <= 1e-5
    assert (spans[1][real] - blocks[1][real]).abs().max() <= 1e-5


def test_a_shape_is_sinks_plus_local_blocks():
    layout = a_shape(40, 40, 8, causal=True, sink_blocks=1, local_blocks=2)
    expected = torch.tensor([[i == j or i - j == 1 or j == 0 for j in range(5)] for i in range(5)]) & \
        torch.ones(5, 5, dtype=torch.bool).tril()
    assert torch.equal(layout.block_mask()[0, 0], expected)
    q, k, v = qkv(40, 40)
    check(q, k, v, layout, True, padding_mask(40, 40))
    bidir = a_shape(40, 40, 8, causal=False, sink_blocks=0, local_blocks=2)
    assert torch.equal(bidir.block_mask()[0, 0], (torch.arange(5)[:, None] - torch.arange(5)).abs() < 2)
    check(q, k, v, bidir, False)


def test_bigbird_window_globals_and_seeded_random():
    layout = bigbird(64, 64, 8, causal=True, window_blocks=1, global_blocks=1, random_blocks=2, heads=HKV, seed=3)
    mask = layout.block_mask()[0]  # (Hkv, 8, 8)
    qb, kb = torch.arange(8)[:, None], torch.arange(8)[None, :]
    assert not (mask & (kb > qb)).any()  # causal
    assert (mask | ~((qb - kb <= 1) & (kb <= qb)) | ~(kb <= qb)).all()  # window kept
    assert mask[..., 0].all()  # global key block
    extra = mask & ~((qb - kb <= 1) | (kb == 0))
    assert torch.equal(extra.sum(-1), ((qb[:, 0] - 2).clamp(0, 2))[None].expand(HKV, -1))  # 2 random where possible
    again = bigbird(64, 64, 8, causal=True, window_blocks=1, global_blocks=1, random_blocks=2, heads=HKV, seed=3)
    assert torch.equal(again.kv_blocks, layout.kv_blocks)
    other = bigbird(64, 64, 8, causal=True, window_blocks=1, global_blocks=1, random_blocks=2, heads=HKV, seed=4)
    assert not torch.equal(other.kv_blocks, layout.kv_blocks)
    q, k, v = qkv(64, 64)
    check(q, k, v, layout, True, padding_mask(64, 64))
    bidir = bigbird(64, 64, 8, causal=False, window_blocks=1, global_blocks=1, random_blocks=1, heads=HKV, seed=0)
    assert bidir.block_mask()[0, :, 0].all()  # global query row attends everything
    check(q, k, v, bidir, False)


def test_star_chunks_anchor_and_global_queries():
    layout = star(64, 64, 8, causal=True, context_blocks=2, anchor_blocks=1, query_tokens=10)
    mask = layout.block_mask()[0, 0]
    assert mask[6:].equal(torch.ones(2, 8, dtype=torch.bool).tril(6))  # last 10 tokens: blocks 6, 7 global
    assert mask[5].tolist() == [True, False, False, False, True, True, False, False]  # anchor + own chunk
    assert mask[3].tolist() == [True, False, True, True, False, False, False, False]
    q, k, v = qkv(64, 64)
    check(q, k, v, layout, True)


@pytest.mark.parametrize("pooling", ["mean", "maxmin"])
def test_block_topk_definition(pooling):
    q, k, v = qkv(48, 48)
    layout = block_topk(q, k, 8, causal=True, top_k=2, pooling=pooling)
    scores = block_scores(q, k, 8, causal=True, pooling=pooling)  # (B, Hkv, 6, 6)
    mask = layout.block_mask()
    for b in range(B):
        for h in range(HKV):
            for row in range(6):
                candidates = [j for j in range(row)]  # admissible blocks besides the diagonal
                best = sorted(candidates, key=lambda j: -float(scores[b, h, row, j]))[:2]
                assert sorted(torch.nonzero(mask[b, h, row]).flatten().tolist()) == sorted(best + [row])
    check(q, k, v, layout, True, padding_mask(48, 48))
    full = block_topk(q, k, 8, causal=True, top_k=100, pooling=pooling)
    check(q, k, v, full, True)
    assert torch.equal(dense_mask(full, 48, 48, True)[0, 0], causal_mask(48, 48, "cpu"))
    per_head = block_topk(q, k, 8, causal=True, top_k=torch.tensor([0, 3]), pooling=pooling)
    kept = per_head.kept_blocks()
    assert (kept[:, 0] == 1).all() and kept[:, 1, -1].eq(4).all()


@pytest.mark.parametrize("pooling", ["mean", "maxmin"])
@pytest.mark.parametrize("causal,lq,lk", [(True, 27, 45), (True, 45, 45), (False, 30, 45)])
def test_block_scores_follow_their_definition_in_small_chunks(monkeypatch, pooling, causal, lq, lk):
    """Each score is the largest estimate over the query block's real rows and the kv head's group;
    causal scores past the diagonal are -inf. Chunks of two query blocks exercise the causal
    truncation (each chunk scores only the key blocks up to its last diagonal)."""
    import attnpatch.ops.block_selection as patterns

    monkeypatch.setattr(patterns, "RECYCLED_SEGMENT_BYTES", B * HQ * 8 * 6 * 2 * 4)
    q, k, _ = qkv(lq, lk, seed=3)
    scores = block_scores(q, k, 8, causal=causal, pooling=pooling)
    start = lk - lq if causal else 0
    first, pad = divmod(start, 8)
    nq, nk = -(-(lq + pad) // 8), -(-lk // 8)
    assert scores.shape == (B, HKV, nq, nk)
    for kb in range(nk):
        keys = k[:, :, kb * 8 : (kb + 1) * 8]  # (B, Hkv, <=8, D)
        if pooling == "mean":
            estimate = q @ repeat_kv(keys.mean(-2, keepdim=True), HQ // HKV).transpose(-1, -2)
        else:
            top, bottom = (repeat_kv(t, HQ // HKV).transpose(-1, -2) for t in (keys.amax(-2, True), keys.amin(-2, True)))
            estimate = q.clamp_min(0) @ top + q.clamp_max(0) @ bottom
        estimate = estimate[..., 0].view(B, HKV, HQ // HKV, lq)  # (B, Hkv, G, Lq)
        for row in range(nq):
            absolute = first + row
            queries = [i for i in range(lq) if (start + i) // 8 == absolute]
            expected = estimate[:, :, :, queries].amax(dim=(2, 3))
            if causal and kb > absolute:
                assert torch.isneginf(scores[:, :, row, kb]).all()
            else:
                assert torch.allclose(scores[:, :, row, kb], expected, atol=1e-5)


@pytest.mark.parametrize("pooling", ["mean", "maxmin"])
@pytest.mark.parametrize("causal,lq,lk", [(True, 27, 45), (True, 45, 45), (False, 30, 45)])
def test_mean_query_scores_follow_their_definition(pooling, causal, lq, lk):
    """query_pooling='mean': each score estimates q . k for the mean of the query block's real rows
    (padding rows of a partial block are left out), per query head, then the largest over the kv
    head's group; causal scores past the diagonal are -inf."""
    q, k, _ = qkv(lq, lk, seed=3)
    scores = block_scores(q, k, 8, causal=causal, pooling=pooling, query_pooling="mean")
    start = lk - lq if causal else 0
    first, pad = divmod(start, 8)
    nq, nk, groups = -(-(lq + pad) // 8), -(-lk // 8), HQ // HKV
    assert scores.shape == (B, HKV, nq, nk)
    for row in range(nq):
        queries = [i for i in range(lq) if (start + i) // 8 == first + row]
        mean_query = q[:, :, queries].mean(-2).view(B, HKV, groups, D)
        for kb in range(nk):
            keys = k[:, :, kb * 8 : (kb + 1) * 8, None]  # (B, Hkv, <=8, 1, D)
            if pooling == "mean":
                estimate = (mean_query * keys.mean(2)).sum(-1)
            else:
                estimate = (mean_query.clamp_min(0) * keys.amax(2) + mean_query.clamp_max(0) * keys.amin(2)).sum(-1)
            if causal and kb > first + row:
                assert torch.isneginf(scores[:, :, row, kb]).all()
            else:
                assert torch.allclose(scores[:, :, row, kb], estimate.amax(-1), atol=1e-5)


def test_query_poolings_agree_on_one_query_blocks():
    q, k, _ = qkv(21, 21, seed=6)
    for pooling in ("mean", "maxmin"):
        each = block_scores(q, k, 1, causal=True, pooling=pooling)
        pooled = block_scores(q, k, 1, causal=True, pooling=pooling, query_pooling="mean")
        assert torch.allclose(each, pooled, atol=1e-6)
    with pytest.raises(ValueError, match="query_pooling"):
        block_scores(q, k, 4, causal=True, pooling="mean", query_pooling="median")


@pytest.mark.parametrize("name", ["llama", "vit"])
def test_block_topk_mean_query_pooling_on_models(monkeypatch, name):
    """query_pooling='mean' reaches every layer's selection (the per-query scorer never runs) and
    keeps what top_k asks: as many blocks as per-query scoring."""
    import attnpatch.ops.block_selection as selection
    from attnpatch import patched_methods

    per_query = selection._per_query_scores
    calls = []
    monkeypatch.setattr(selection, "_per_query_scores", lambda *a: calls.append(1) or per_query(*a))
    model = tm.build(name)
    densities = {}
    for query_pooling in ("mean", "max"):
        calls.clear()
        patch_model(model, "block_topk", block_size=4, top_k=1, sink_blocks=0, query_pooling=query_pooling)
        with torch.no_grad():
            tm.run(name, model)
        methods = patched_methods(model)
        densities[query_pooling] = [m.last_density for m in methods]
        assert len(calls) == (0 if query_pooling == "mean" else len(methods))
        unpatch_model(model)
    assert densities["mean"] == pytest.approx(densities["max"]) and all(d < 1 for d in densities["mean"])
    with pytest.raises(PatchError, match="query_pooling"):
        patch_model(model, "block_topk", query_pooling="median")


def test_kernel_in_chunks_reuses_its_buffers_and_keeps_gradients(monkeypatch):
    """Many small chunks of mixed widths, some of consecutive query blocks (read and written as
    slices) and some not: without autograd the gathers go to reused buffers (counted), with autograd
    to fresh tensors; both equal naive attention, and the gradients equal naive attention's."""
    import attnpatch.ops.block_sparse as kernel

    monkeypatch.setattr(kernel, "_CHUNK_ELEMENTS", 4 * 16 * 16 * 3)
    q, k, v = qkv(64, 64, seed=4)
    g = torch.Generator().manual_seed(5)
    blocks = (torch.rand(B, HKV, 8, 8, generator=g) < 0.4) | torch.eye(8, dtype=torch.bool)  # diagonal: plain items
    layout = layout_from_block_mask(blocks, 8, 0)
    buffered = []
    index_select = torch.index_select

    def counting(*args, **kwargs):
        buffered.append("out" in kwargs)
        return index_select(*args, **kwargs)

    monkeypatch.setattr(torch, "index_select", counting)
    with torch.no_grad():
        check(q, k, v, layout, True)
    assert buffered and all(buffered)
    allowed = dense_mask(layout, 64, 64, True).expand(B, HKV, 64, 64)
    ref_inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    naive_attention(*ref_inputs, repeat_kv(allowed, HQ // HKV), scaling=D**-0.5).square().sum().backward()
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    buffered.clear()
    block_sparse_attention(*inputs, layout, None, causal=True, scaling=D**-0.5).square().sum().backward()
    assert not any(buffered)
    for mine, ref in zip(inputs, ref_inputs):
        assert torch.allclose(mine.grad, ref.grad, atol=1e-5)


def test_maxmin_scores_bound_every_query_key_product():
    q, k, _ = qkv(32, 32)
    bound = block_scores(q, k, 8, causal=False, pooling="maxmin")  # (B, Hkv, 4, 4)
    dots = repeat_kv(k, 1)
    for h in range(HQ):
        exact = q[:, h] @ dots[:, h // 2].transpose(-1, -2)  # (B, 32, 32)
        block_max = exact.view(B, 4, 8, 4, 8).amax(dim=(2, 4))
        assert (block_max <= bound[:, h // 2] + 1e-5).all()


def test_vertical_slash_pattern():
    q, k, v = qkv(64, 64)
    layout = vertical_slash(q, k, 8, scaling=D**-0.5, last_q=16, vertical=4, slash=2)
    allowed = dense_mask(layout, 64, 64, True)
    assert allowed.diagonal(dim1=-2, dim2=-1).all()  # the main diagonal always
    check(q, k, v, layout, True, padding_mask(64, 64))
    full = vertical_slash(q, k, 8, scaling=D**-0.5, last_q=16, vertical=64, slash=64)
    assert torch.equal(dense_mask(full, 64, 64, True).expand(B, HKV, 64, 64),
                       causal_mask(64, 64, "cpu").expand(B, HKV, 64, 64))
    # the top column of each head is kept for every query that can see it
    obs = torch.softmax((q[..., -16:, :] @ repeat_kv(k, 2).transpose(-1, -2)) * D**-0.5
                        + torch.where(causal_mask(16, 64, "cpu"), 0.0, float("-inf")), -1)
    columns = obs.view(B, HKV, 2, 16, 64).sum(dim=(2, 3)).argmax(-1)  # (B, Hkv)
    for b in range(B):
        for h in range(HKV):
            c = int(columns[b, h])
            assert allowed[b, h, c:, c].all()


FULL = {"a_shape": {"block_size": 4, "local_blocks": 100}, "block_topk": {"block_size": 4, "top_k": 100},
        "bigbird": {"block_size": 4, "window_blocks": 100}, "star": {"block_size": 4, "query_tokens": 1000},
        "vertical_slash": {"block_size": 4, "vertical": 1000, "slash": 1000}}
SPARSE = {"a_shape": {"block_size": 4, "local_blocks": 1}, "block_topk": {"block_size": 4, "top_k": 0},
          "bigbird": {"block_size": 4, "window_blocks": 0, "random_blocks": 0},
          "star": {"block_size": 4, "context_blocks": 1, "anchor_blocks": 0, "query_tokens": 1},
          "vertical_slash": {"block_size": 4, "vertical": 1, "slash": 1}}


@pytest.mark.parametrize("method,name", [(method, name) for method in FULL for name in ("llama", "gemma2", "vit")
                                         if not (name == "vit" and method == "vertical_slash")])  # decoder-only
def test_full_budget_equals_dense_and_sparse_differs(method, name):
    model = tm.build(name)
    if name == "vit":
        def run():
            return tm.run(name, model)
    else:
        def run():  # real positions only: padding rows are undefined (eager gives them uniform weights)
            return tm.run(name, model, left_pad=3)[tm.text_batch(left_pad=3)[1].bool()]
    before = run()
    patch_model(model, method, **FULL[method])
    assert (run() - before).abs().max() <= 1e-4
    unpatch_model(model)
    patch_model(model, method, **SPARSE[method])
    assert (run() - before).abs().max() > 1e-3
    unpatch_model(model)
    assert torch.equal(run(), before)


@pytest.mark.parametrize("method", ["block_topk", "vertical_slash", "a_shape"])
def test_generate_decodes_through_a_dense_cache(method):
    model = tm.build("llama")
    ids, mask = tm.text_batch(length=20, left_pad=3)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    dense = model.generate(**kwargs)
    patch_model(model, method, **FULL[method])
    assert torch.equal(model.generate(**kwargs), dense)
    unpatch_model(model)
    patch_model(model, method, **SPARSE[method])
    out = model.generate(**kwargs)
    assert out.shape == dense.shape  # sparse prefill, exact dense decoding steps


@pytest.mark.parametrize("name,left_pad", [("llama", 3), ("mistral", 3), ("llama", 0), ("mistral", 0)])
def test_sliding_window_decodes_from_a_cache_of_sinks_and_window(monkeypatch, name, left_pad):
    """Decoding keeps only each row's sinks and newest window - 1 tokens (the duo_heads store with
    every head streaming), exactly: every step's logits equal a cache-free forward of the whole
    sequence so far, on a left-padded batch (Mistral: under the model's own sliding window too).
    Without padding a step attends the trimmed store without a mask (counted); with padding, masked."""
    import attnpatch.methods.heads.duo as duo
    from attnpatch import cache_nbytes
    from attnpatch.runtime.cache import cache_kwargs
    from attnpatch.runtime.layers import DuoHeadLayer
    from transformers import DynamicCache

    masked = []
    sdpa_attention = duo.sdpa_attention

    def counting(call, allowed, is_causal):
        masked.append(allowed is not None)
        return sdpa_attention(call, allowed, is_causal)

    monkeypatch.setattr(duo, "sdpa_attention", counting)
    model = tm.build(name)
    patch_model(model, "sliding_window", window=5, sinks=2)
    ids, mask = tm.text_batch(length=20, left_pad=left_pad)
    follow = torch.randint(3, tm.V - 2, (2, 6), generator=torch.Generator().manual_seed(4))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        steps = [model(input_ids=ids, attention_mask=mask, **cache_kwargs(model, cache), use_cache=True).logits[:, -1]]
        for t in range(6):
            mask = torch.cat([mask, mask.new_ones(2, 1)], 1)
            steps.append(model(input_ids=follow[:, t:t + 1], attention_mask=mask, **cache_kwargs(model, cache),
                               use_cache=True).logits[:, -1])
        assert all(isinstance(layer, DuoHeadLayer) for layer in cache.layers)
        assert len(masked) == 6 * len(cache.layers) and all(masked) == bool(left_pad) and any(masked) == bool(left_pad)
        # stored: at most the sinks of the padded row and of the other, plus the newest window - 1
        assert all(layer.stream_keys.shape[-2] <= 2 + 3 + 4 for layer in cache.layers)
        whole = torch.cat([ids, follow], 1)
        for t, logits in enumerate(steps):
            n = 20 + t
            free = model(input_ids=whole[:, :n], attention_mask=mask[:, :n], use_cache=False).logits[:, -1]
            assert torch.allclose(logits, free, atol=1e-5), (t, (logits - free).abs().max())
    unpatch_model(model)
    dense = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=whole, attention_mask=mask, **cache_kwargs(model, dense), use_cache=True)
    # Llama: 9 of 26 entries (+ a validity byte per token); Mistral: the model's own window (6) hides the
    # sinks, so 4 entries against the 5 its own sliding-window cache keeps
    assert cache_nbytes(cache) < {"llama": 0.45, "mistral": 0.85}[name] * cache_nbytes(dense)


def test_bad_parameters_name_the_fix():
    model = tm.build("llama")
    with pytest.raises(PatchError, match="kv heads"):
        patch_model(model, "block_topk", head_top_k=[1, 2, 3, 4, 5])
    with pytest.raises(PatchError, match="decoder"):
        patch_model(tm.build("vit"), "vertical_slash")
    with pytest.raises(PatchError, match="pooling"):
        patch_model(model, "block_topk", pooling="median")
    with pytest.raises(PatchError, match="top_k"):
        patch_model(model, "block_topk", top_k=-1)
    kv_heads = model.config.num_key_value_heads
    patch_model(model, "block_topk", head_top_k=list(range(kv_heads)), block_size=4)
    ids, mask = tm.text_batch(length=20)
    model(input_ids=ids, attention_mask=mask)


def test_density_counts_computed_blocks():
    layout = a_shape(64, 64, 8, causal=True, sink_blocks=1, local_blocks=2)
    # rows 0..7 keep 1, 2, 3, 3, 3, 3, 3, 3 blocks of the 1 + 2 + ... + 8 = 36 causal ones
    assert abs(layout.density(64, True) - 21 / 36) < 1e-9
    full = layout_from_block_mask(torch.ones(1, 1, 8, 8, dtype=torch.bool), 8, 0)
    assert full.density(64, False) == 1.0


@pytest.mark.parametrize("method,params", [("block_topk", {"block_size": 4, "top_k": 2}),
                                           ("a_shape", {"block_size": 4, "local_blocks": 2})])
def test_density_is_worked_out_when_read_not_in_every_call(monkeypatch, method, params):
    """A forward computes no density (on a GPU each would wait for the device, once per layer);
    reading `last_density` gives the latest call's, the same as its layout's."""
    from attnpatch import patched_methods
    from attnpatch.ops.block_sparse import BlockLayout

    counted = []
    original = BlockLayout.density
    monkeypatch.setattr(BlockLayout, "density", lambda self, *a: counted.append(1) or original(self, *a))
    model = tm.build("llama")
    patch_model(model, method, **params)
    ids, _ = tm.text_batch(length=30)
    with torch.no_grad():
        model(input_ids=ids)
    assert counted == []
    methods = patched_methods(model)
    densities = [m.last_density for m in methods]
    assert len(counted) == len(methods) and all(0 < d < 1 for d in densities)
    if method == "a_shape":  # the span path's value: its layout's, as the block kernel would compute it
        assert densities[0] == original(a_shape(30, 30, 4, causal=True, sink_blocks=1, local_blocks=2), 30, True)


@pytest.mark.parametrize("pooling,query_pooling", [("mean", "max"), ("mean", "mean"), ("maxmin", "max")])
def test_block_topk_finds_the_block_built_to_matter(pooling, query_pooling):
    """Planted structure: key block 2 of each (sequence, kv head) holds keys along a direction every
    query shares, the rest is noise; with one chosen block besides the sink and the diagonal, every
    query block past it must choose block 2 (and a row's own noise must not win)."""
    g = torch.Generator().manual_seed(5)
    bs, length = 8, 64
    direction = torch.nn.functional.normalize(torch.randn(D, generator=g), dim=0)
    q = 0.1 * torch.randn(B, HQ, length, D, generator=g) + direction
    k = 0.1 * torch.randn(B, HKV, length, D, generator=g)
    k[:, :, 2 * bs:3 * bs] += 3 * direction
    layout = block_topk(q, k, bs, causal=True, top_k=1, pooling=pooling, query_pooling=query_pooling,
                        sink_blocks=1, local_blocks=1)
    for row in range(4, length // bs):  # query blocks whose own diagonal and sink are not block 2
        chosen = layout.kv_blocks[..., row, :]
        assert bool((chosen == 2).any(-1).all()), (row, chosen)
        assert int((chosen >= 0).sum(-1).max()) == 3  # the sink, the diagonal, the chosen block: no more
