"""Ops against naive O(n^2) references."""

import pytest
import torch

from attnpatch.ops.linear import (
    EluFeatureMap,
    HedgehogFeatureMap,
    PerformerFeatureMap,
    ReluFeatureMap,
    TaylorFeatureMap,
    bidirectional_linear_attention,
    causal_linear_attention,
    naive_linear_attention,
)
from attnpatch.ops.reference import naive_attention, window_mask
from attnpatch.ops.sliding import sliding_window_attention

B, HQ, HKV, D = 2, 4, 2, 8


def qkv(lq, lk=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    lk = lq if lk is None else lk
    return (torch.randn(B, HQ, lq, D, generator=g), torch.randn(B, HKV, lk, D, generator=g),
            torch.randn(B, HKV, lk, D, generator=g))


def literal_window_attention(q, k, v, mask, *, causal, window, sinks, softcap=None):
    """The sliding window written out here, query by query in float64 (no library mask or attention):
    query i at position lk - lq + i (causal) sees key j when j < sinks or j is among its `window`
    nearest (causal: j in (p - window, p]; bidirectional: |p - j| < window), never a future key, and
    only where the model's mask allows; a query that sees nothing outputs 0."""
    b, hq, lq, d = q.shape
    lk, groups = k.shape[2], hq // k.shape[1]
    out = torch.zeros(b, hq, lq, v.shape[-1], dtype=torch.float64)
    for row in range(b):
        for head in range(hq):
            keys, values = k[row, head // groups].double(), v[row, head // groups].double()
            for i in range(lq):
                p = lk - lq + i if causal else i
                seen = [j for j in range(lk)
                        if (j < sinks or (p - window < j <= p if causal else abs(p - j) < window))
                        and (not causal or j <= p)
                        and (mask is None or bool(mask[row if mask.shape[0] > 1 else 0, 0, i, j]))]
                if not seen:
                    continue
                logits = keys[seen] @ q[row, head, i].double() * d**-0.5
                if softcap is not None:
                    logits = torch.tanh(logits / softcap) * softcap
                out[row, head, i] = torch.softmax(logits, 0) @ values[seen]
    return out.to(q.dtype)


FEATURE_MAPS = {
    "elu": lambda: EluFeatureMap(),
    "relu": lambda: ReluFeatureMap(),
    "taylor": lambda: TaylorFeatureMap(D, D**-0.5),
    "performer": lambda: PerformerFeatureMap(D, D**-0.5, 32, seed=1),
    "hedgehog": lambda: HedgehogFeatureMap(HQ, D),
}


def features(name, q, k):
    fmap = FEATURE_MAPS[name]()
    if name == "hedgehog":  # separate maps for the query heads and the kv heads
        with torch.no_grad():
            fmap.weight.add_(0.1 * torch.randn_like(fmap.weight))
        fk_map = HedgehogFeatureMap(HKV, D)
        return fmap(q, True), fk_map(k, False)
    return fmap(q, True), fmap(k, False)


@pytest.mark.parametrize("name", list(FEATURE_MAPS))
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_causal_linear_equals_masked_quadratic(name, chunk):
    q, k, v = qkv(37)
    fq, fk = features(name, q, k)
    out, _ = causal_linear_attention(fq, fk, v, chunk_size=chunk)
    ref = naive_linear_attention(fq, fk, v, causal=True)
    assert torch.allclose(out.double(), ref, atol=1e-4, rtol=1e-4), (out.double() - ref).abs().max()


@pytest.mark.parametrize("name", ["elu", "hedgehog"])
def test_causal_linear_padding_prefix_and_state_continuation(name):
    q, k, v = qkv(20, 29)
    fq, fk = features(name, q, k)
    valid = torch.ones(B, 29, dtype=torch.bool)
    valid[0, :4] = False
    full, state = causal_linear_attention(fq, fk, v, key_valid=valid, chunk_size=7)
    ref = naive_linear_attention(fq, fk, v, causal=True, key_valid=valid)
    assert torch.allclose(full.double(), ref, atol=1e-4)
    # the same keys fed as a 9-key prefix then 20 steps one at a time
    _, st = causal_linear_attention(fq[:, :, :0], fk[:, :, :9], v[:, :, :9], key_valid=valid[:, :9])
    steps = []
    for i in range(20):
        o, st = causal_linear_attention(fq[:, :, i:i + 1], fk[:, :, 9 + i:10 + i], v[:, :, 9 + i:10 + i], state=st)
        steps.append(o)
    assert torch.allclose(torch.cat(steps, dim=-2), full, atol=1e-5)
    assert torch.allclose(st.kv, state.kv, atol=1e-4)
    assert st.kv.shape == (B, HKV, fk.shape[-1], D)  # fixed size, independent of length


def test_causal_linear_segments_chunked_continuation_and_gradients(monkeypatch):
    from attnpatch.ops import linear as linear_ops

    monkeypatch.setattr(linear_ops, "RECYCLED_SEGMENT_BYTES", 1)  # one chunk per segment: the segment loop runs
    q, k, v = (t.requires_grad_() for t in qkv(37))
    fq, fk = EluFeatureMap()(q, True), EluFeatureMap()(k, False)
    out, state = causal_linear_attention(fq, fk, v, chunk_size=4)
    ref = naive_linear_attention(fq, fk, v, causal=True)
    assert out.stride(1) == D  # a (B, L, H, D) tensor seen as (B, H, L, D): the model's layout, no copy
    assert torch.allclose(out.double(), ref, atol=1e-5)
    # a prefill of 16 tokens, then 21 more continuing from its state, equals the one prefill
    first, mid = causal_linear_attention(fq[:, :, :16], fk[:, :, :16], v[:, :, :16], chunk_size=4)
    second, end = causal_linear_attention(fq[:, :, 16:], fk[:, :, 16:], v[:, :, 16:], state=mid, chunk_size=4)
    assert torch.allclose(torch.cat([first, second], dim=-2).double(), ref, atol=1e-5)
    assert torch.allclose(end.kv, state.kv, atol=1e-4)
    # gradients through the in-place chunk arithmetic equal the quadratic reference's
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v), retain_graph=True)
    expected = torch.autograd.grad((ref * weights.double()).sum(), (q, k, v))
    for got, want in zip(grads, expected):
        assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


@pytest.mark.parametrize("name", list(FEATURE_MAPS))
def test_bidirectional_linear_equals_quadratic(name):
    q, k, v = qkv(11, 17)
    fq, fk = features(name, q, k)
    valid = torch.ones(B, 17, dtype=torch.bool)
    valid[1, -3:] = False
    out = bidirectional_linear_attention(fq, fk, v, key_valid=valid)
    ref = naive_linear_attention(fq, fk, v, causal=False, key_valid=valid)
    assert torch.allclose(out.double(), ref, atol=1e-5)


def test_taylor_kernel_is_second_order_exp():
    q, k, _ = qkv(6)
    fmap = TaylorFeatureMap(D, D**-0.5)
    s = (q @ k[:, :1].transpose(-1, -2)) * D**-0.5
    got = fmap(q, True) @ fmap(k[:, :1], False).transpose(-1, -2)
    assert torch.allclose(got, 1 + s + s**2 / 2, atol=1e-5)
    assert fmap(q, True).shape[-1] == fmap.feature_dim(D) == 1 + D + D * (D + 1) // 2


def test_performer_estimates_softmax_kernel():
    g = torch.Generator().manual_seed(0)
    q, k = 0.5 * torch.randn(1, 1, 64, D, generator=g), 0.5 * torch.randn(1, 1, 64, D, generator=g)
    fmap = PerformerFeatureMap(D, D**-0.5, 16384, seed=0)
    fq, fk = fmap(q, False), fmap(k, False)  # no query stabiliser: compare raw kernel values
    est = fq @ fk.transpose(-1, -2)
    exact = torch.exp((q @ k.transpose(-1, -2)) * D**-0.5)
    assert ((est - exact).abs() / exact).mean() < 0.03  # unbiased: error falls as features grow


def test_hedgehog_identity_init():
    fmap = HedgehogFeatureMap(HQ, D)
    x = torch.randn(B, HQ, 3, D)
    expected = torch.cat([torch.softmax(x, -1), torch.softmax(-x, -1)], -1)
    assert torch.allclose(fmap(x, True), expected, atol=1e-6)
    assert fmap.weight.requires_grad


@pytest.mark.parametrize("tokens", [1, 9])
def test_hedgehog_paths_follow_the_definition(tokens):
    """Decoding steps and training take the stacked softmax, a prefill without autograd the signed
    matmul with the softmax in place (a strided input, as the model's (B, L, H, D) layout gives): all
    equal softmax([xW + b, -(xW + b)]) and its gradients."""
    fmap = HedgehogFeatureMap(HQ, D)
    with torch.no_grad():
        fmap.weight.add_(0.3 * torch.randn_like(fmap.weight))
        fmap.bias.add_(0.3 * torch.randn_like(fmap.bias))
    x = torch.randn(B, tokens, HQ, D).transpose(1, 2)
    projected = x.double() @ fmap.weight.double() + fmap.bias.double()
    expected = torch.cat([torch.softmax(projected, -1), torch.softmax(-projected, -1)], -1)
    with torch.no_grad():
        assert torch.allclose(fmap(x, True).double(), expected, atol=1e-6)
    trained = fmap(x, True)  # autograd on: the out-of-place path
    assert torch.allclose(trained.double(), expected, atol=1e-6)
    (grad,) = torch.autograd.grad((trained * torch.arange(2 * D)).sum(), fmap.weight)
    (want,) = torch.autograd.grad((expected * torch.arange(2 * D)).sum(), fmap.weight)
    assert torch.allclose(grad, want, atol=1e-4)


@pytest.mark.parametrize("window,sinks", [(1, 0), (5, 0), (5, 3), (8, 2), (1000, 0)])
@pytest.mark.parametrize("causal,lq,lk", [(True, 33, 33), (True, 7, 40), (True, 1, 40), (False, 33, 33)])
def test_sliding_window_equals_masked_dense(causal, window, sinks, lq, lk):
    q, k, v = qkv(lq, lk)
    pad = torch.ones(B, 1, lq, lk, dtype=torch.bool)
    pad[0, ..., :3] = False  # left padding on sequence 0
    for mask in (pad, None):  # the model's mask (padding rows), and none (one shared block mask)
        out = sliding_window_attention(q, k, v, mask, window=window, sinks=sinks, causal=causal, block_size=6)
        ref = literal_window_attention(q, k, v, mask, causal=causal, window=window, sinks=sinks)
        assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()


@pytest.mark.parametrize("window,sinks,block,length", [(16, 0, 4, 203), (16, 5, 4, 203), (3, 9, 4, 64), (1, 0, 8, 80),
                                                        (13, 2, 8, 96)])
def test_sliding_window_prefill_all_blocks_at_once(monkeypatch, window, sinks, block, length):
    """The causal prefill without a mask runs its full blocks clear of the sinks in one pass (overlapping
    key views, segments): equal to the definition, and that path really ran, segment loop included."""
    import attnpatch.ops.sliding as sliding_ops

    covered = []
    prefill = sliding_ops._prefill_full_blocks
    monkeypatch.setattr(sliding_ops, "_prefill_full_blocks", lambda *a: covered.append(prefill(*a)) or covered[-1])
    monkeypatch.setattr(sliding_ops, "SEGMENT_BYTES", 1)  # one block per segment: the segment loop runs
    q, k, v = qkv(length, seed=3)
    out = sliding_window_attention(q, k, v, None, window=window, sinks=sinks, causal=True, block_size=block)
    ref = literal_window_attention(q, k, v, None, causal=True, window=window, sinks=sinks)
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
    first = -(-(window - 1) // block) + -(-sinks // block)  # blocks whose span lies after the sinks
    assert covered == [range(first * block, length // block * block, block)]


def test_sliding_window_softcap_and_full_window_is_dense():
    q, k, v = qkv(21)
    out = sliding_window_attention(q, k, v, None, window=3, sinks=1, causal=True, softcap=2.0, block_size=4)
    ref = literal_window_attention(q, k, v, None, causal=True, window=3, sinks=1, softcap=2.0)
    assert torch.allclose(out, ref, atol=1e-5)
    dense = naive_attention(q, k, v, None, causal=True)
    assert torch.allclose(sliding_window_attention(q, k, v, None, window=21, causal=True), dense, atol=1e-5)


def test_window_mask_definition():
    m = window_mask(6, 6, window=2, sinks=1, causal=True, device="cpu")
    expected = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 0, 1, 1, 0, 0],
                             [1, 0, 0, 1, 1, 0], [1, 0, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(m, expected)
    bi = window_mask(4, 4, window=2, sinks=0, causal=False, device="cpu")
    assert torch.equal(bi, torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 1, 1]], dtype=torch.bool))


def test_naive_attention_matches_sdpa():
    q, k, v = qkv(9)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    assert torch.allclose(naive_attention(q, k, v, causal=True), sdpa, atol=1e-6)


def test_segments_are_sized_for_cpu_caches_on_the_cpu_and_by_memory_elsewhere(monkeypatch):
    """Off the CPU each kernel launch costs host time, so chunked kernels take DEVICE_SEGMENT_BYTES
    segments there (read at call time: a benchmark sweeps it); the CPU keeps its cache-sized ones."""
    from attnpatch.ops import segments

    assert segments.segment_bytes(torch.device("cpu"), 4 << 20) == 4 << 20
    assert segments.segment_bytes(torch.device("cuda", 0), 4 << 20) == segments.DEVICE_SEGMENT_BYTES > 4 << 20
    monkeypatch.setattr(segments, "DEVICE_SEGMENT_BYTES", 1 << 20)
    assert segments.segment_bytes("cuda", 4 << 20) == 4 << 20  # never below the CPU's size
    assert segments.segment_bytes("cuda", 64 << 20) == 64 << 20


def test_exclusive_prefix_sum_loop_and_cumsum_agree():
    """The CPU's loop of adds and the cumsum autograd (and accelerators) take: the state before each chunk."""
    from attnpatch.ops.linear import exclusive_prefix_sum

    chunks, initial = torch.randn(2, 3, 7, 4, 5), torch.randn(2, 3, 4, 5)
    expected = torch.stack([initial + chunks[:, :, :j].sum(2) for j in range(7)], dim=2)
    for needs_grad in (False, True):
        assert torch.allclose(exclusive_prefix_sum(chunks, initial, needs_grad), expected, atol=1e-5)
    meta = exclusive_prefix_sum(chunks.to("meta"), initial.to("meta"), False)  # the accelerator branch: one op
    assert meta.shape == chunks.shape and meta.device.type == "meta"
