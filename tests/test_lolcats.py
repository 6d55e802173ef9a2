"""LoLCATs hybrid attention: chunked forms against the quadratic definition, decoding with a
window + state cache against the full forward, and exactness when the window covers everything."""

import pytest
import tiny_models as tm
import torch
from transformers import DynamicCache

from attnpatch import PatchError, cache_nbytes, load_patched, patch_model, save_patched, trainable_parameters
from attnpatch.ops.hybrid import hybrid_attention, naive_hybrid_attention
from attnpatch.ops.linear import EluFeatureMap, HedgehogFeatureMap
from attnpatch.runtime.layers import HybridWindowLayer
from method_cases import MatrixCase

MATRIX_CASES = {"lolcats": MatrixCase(["llama", "vit"], {"window": 4, "chunk_size": 4, "gate_init": 0.5})}

B, HQ, HKV, D = 2, 4, 2, 8


def inputs(lq, lk=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    lk = lq if lk is None else lk
    return (torch.randn(B, HQ, lq, D, generator=g), torch.randn(B, HKV, lk, D, generator=g),
            torch.randn(B, HKV, lk, D, generator=g), torch.sigmoid(torch.randn(HQ, generator=g)))


def literal_hybrid(q, k, v, fq, fk, gate, *, window, scaling, causal, key_valid, softcap=None):
    """LoLCATs' hybrid written out query by query in float64, from the paper's formula (nothing shared with
    the library): query i at position p; W = its window (causal p - window < j <= p, else |p - j| < window),
    L = the other visible keys; e_j = exp(s_j - max_W s), s = q.k * scaling (softcapped);
    out = (g sum_W e_j v_j + (1-g) sum_L phi(q).phi(k_j) v_j) / (g sum_W e_j + (1-g) sum_L phi(q).phi(k_j))."""
    b, hq, lq, _ = q.shape
    lk, groups = k.shape[2], hq // k.shape[1]
    out = torch.zeros(b, hq, lq, v.shape[-1], dtype=torch.float64)
    for row in range(b):
        for head in range(hq):
            kv, g = head // groups, float(gate[head])
            for i in range(lq):
                p = lk - lq + i if causal else i
                visible = [j for j in range(lk) if bool(key_valid[row, j]) and (not causal or j <= p)]
                near = [j for j in visible if (p - j < window if causal else abs(p - j) < window)]
                far = [j for j in visible if j not in near]
                if not visible:
                    continue
                num = torch.zeros(v.shape[-1], dtype=torch.float64)
                den = torch.zeros((), dtype=torch.float64)
                if near:
                    s = k[row, kv, near].double() @ q[row, head, i].double() * scaling
                    if softcap is not None:
                        s = torch.tanh(s / softcap) * softcap
                    e = torch.exp(s - s.max())
                    num += g * (e @ v[row, kv, near].double())
                    den += g * e.sum()
                if far:
                    lin = fk[row, kv, far].double() @ fq[row, head, i].double()
                    num += (1 - g) * (lin @ v[row, kv, far].double())
                    den += (1 - g) * lin.sum()
                out[row, head, i] = num / den
    return out


def features(name, q, k):
    if name == "elu":
        f = EluFeatureMap()
        return f(q, True), f(k, False)
    fq, fk = HedgehogFeatureMap(HQ, D), HedgehogFeatureMap(HKV, D)
    with torch.no_grad():
        fq.weight.add_(0.2 * torch.randn_like(fq.weight))
    return fq(q, True), fk(k, False)


@pytest.mark.parametrize("fmap", ["elu", "hedgehog"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window,block", [(1, 4), (5, 7), (8, 3), (100, 16)])
def test_hybrid_equals_quadratic_definition(fmap, causal, window, block):
    q, k, v, gate = inputs(29)
    fq, fk = features(fmap, q, k)
    valid = torch.ones(B, 29, dtype=torch.bool)
    valid[0, :4] = False
    out, _ = hybrid_attention(q, k, v, fq, fk, gate, window=window, scaling=D**-0.5, causal=causal, key_valid=valid,
                              block_size=block, softcap=3.0 if window == 5 else None)
    ref = literal_hybrid(q, k, v, fq, fk, gate, window=window, scaling=D**-0.5, causal=causal, key_valid=valid,
                         softcap=3.0 if window == 5 else None)
    real = torch.ones(B, 1, 29, 1, dtype=torch.bool)
    real[0, :, :4] = False  # padding queries have no defined output
    assert torch.where(real, (out.double() - ref).abs(), 0.0).max() <= 1e-5
    # the library's quadratic form (the other tests' reference) is the same definition
    quadratic = naive_hybrid_attention(q, k, v, fq, fk, gate, window=window, scaling=D**-0.5, causal=causal,
                                       key_valid=valid, softcap=3.0 if window == 5 else None)
    assert torch.where(real, (quadratic - ref).abs(), 0.0).max() <= 1e-9


@pytest.mark.parametrize("window,block", [(5, 4), (9, 4), (3, 8)])
def test_prefill_segments_state_and_gradients_match_the_definition(monkeypatch, window, block):
    import attnpatch.ops.hybrid as hybrid_ops

    monkeypatch.setattr(hybrid_ops, "RECYCLED_SEGMENT_BYTES", 1)  # one chunk per segment: the segment loop runs
    q, k, v, gate = inputs(30)
    fq, fk = features("hedgehog", q, k)
    leaves = [t.detach().requires_grad_() for t in (q, k, v, fq, fk, gate)]
    valid = torch.ones(B, 30, dtype=torch.bool)
    valid[1, :3] = False
    out, state = hybrid_attention(*leaves, window=window, scaling=D**-0.5, key_valid=valid, block_size=block)
    ref = naive_hybrid_attention(*leaves, window=window, scaling=D**-0.5, key_valid=valid)
    real = torch.ones(B, 1, 30, 1, dtype=torch.bool)
    real[1, :, :3] = False
    assert torch.where(real, (out.double() - ref).abs(), 0.0).max() <= 1e-5
    assert out.stride(2) == HQ * D and out.stride(1) == D  # written in the model's (B, L, H, D) layout
    # the carried state is every valid key but the last window - 1
    kept = 30 - (window - 1)
    fk_valid = leaves[4].detach() * valid[:, None, :, None]
    assert torch.allclose(state.kv, fk_valid[..., :kept, :].transpose(-1, -2) @ v[..., :kept, :], atol=1e-4)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)) * real
    grads = torch.autograd.grad((out * weights).sum(), leaves, retain_graph=True)
    expected = torch.autograd.grad((ref * weights.double()).sum(), leaves)
    for got, want in zip(grads, expected):
        assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


def test_window_covering_everything_is_softmax():
    from attnpatch.ops.reference import naive_attention

    q, k, v, gate = inputs(17)
    fq, fk = features("elu", q, k)
    for causal in (True, False):
        out, _ = hybrid_attention(q, k, v, fq, fk, gate, window=17, scaling=D**-0.5, causal=causal)
        assert torch.allclose(out, naive_attention(q, k, v, causal=causal, scaling=D**-0.5), atol=1e-5)


@pytest.mark.parametrize("padded,softcap", [(False, None), (True, None), (False, 3.0)])
def test_decoding_step_matches_the_definition_and_its_gradients(padded, softcap):
    from attnpatch.ops.hybrid import hybrid_decoding_step
    from attnpatch.ops.linear import accumulate_state, zero_state

    length, window = 12, 5
    q, k, v, gate = inputs(length, seed=3)
    fq, fk = features("hedgehog", q, k)
    valid = torch.ones(B, length, dtype=torch.bool)
    if padded:
        valid[0, :3] = False
    old = length - window  # keys before the step's window live in the state
    state = accumulate_state(zero_state(fk, v), fk[:, :, :old] * valid[:, None, :old, None], v[:, :, :old])
    logit = torch.logit(gate).detach().requires_grad_()
    leaves = [t[..., -1:, :].detach().requires_grad_() for t in (q, fq)] + [
        t[:, :, old:].detach().requires_grad_() for t in (k, v, fk)]
    out, after = hybrid_decoding_step(leaves[0], leaves[2], leaves[3], leaves[1], leaves[4], logit, window=window,
                                      scaling=D**-0.5, key_valid=valid[:, old:] if padded else None, state=state,
                                      softcap=softcap)
    full = [torch.cat([t[..., :-1, :].double(), leaf.double()], dim=-2) for t, leaf in ((q, leaves[0]), (fq, leaves[1]))]
    keys = [torch.cat([t[:, :, :old].double(), leaf.double()], dim=-2) for t, leaf in zip((k, v, fk), leaves[2:])]
    ref = naive_hybrid_attention(full[0], keys[0], keys[1], full[1], keys[2], torch.sigmoid(logit.double()),
                                 window=window, scaling=D**-0.5, key_valid=valid, softcap=softcap)[..., -1:, :]
    assert (out.double() - ref).abs().max() <= 1e-5
    # the state now also holds the key that left the window (the first of the step's keys)
    leaving = fk[:, :, old:old + 1] * valid[:, None, old:old + 1, None]
    expected = accumulate_state(state, leaving, v[:, :, old:old + 1])
    assert torch.allclose(after.kv, expected.kv, atol=1e-5) and torch.allclose(after.k_sum, expected.k_sum, atol=1e-5)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    used = leaves[:4] + [logit]  # the window keys' features reach only the state, not this step's output
    grads = torch.autograd.grad((out * weights).sum(), used)
    expected_grads = torch.autograd.grad((ref * weights.double()).sum(), used)
    for got, want in zip(grads, expected_grads):
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_state_carries_everything_outside_the_window():
    q, k, v, gate = inputs(24)
    fq, fk = features("elu", q, k)
    full, _ = hybrid_attention(q, k, v, fq, fk, gate, window=5, scaling=D**-0.5)
    # the first 10 tokens, then the rest with only the last window-1 keys and the carried state
    _, state = hybrid_attention(q[..., :10, :], k[..., :10, :], v[..., :10, :], fq[..., :10, :], fk[..., :10, :],
                                gate, window=5, scaling=D**-0.5)
    tail, _ = hybrid_attention(q[..., 10:, :], k[..., 6:, :], v[..., 6:, :], fq[..., 10:, :], fk[..., 6:, :], gate,
                               window=5, scaling=D**-0.5, state=state)
    assert torch.allclose(tail, full[..., 10:, :], atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "gemma2", "phi3"])
def test_decoding_with_window_and_state_matches_full_forward(name):
    model = tm.build(name)
    patch_model(model, "lolcats", window=4, chunk_size=3)
    ids, _ = tm.text_batch(length=14)
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        steps, sizes = [model(input_ids=ids[:, :5], past_key_values=cache).logits], []
        for t in range(5, 14):
            steps.append(model(input_ids=ids[:, t:t + 1], past_key_values=cache).logits)
            sizes.append(cache_nbytes(cache))
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-4)
    assert len(set(sizes)) == 1  # window K/V + state: constant while decoding
    assert all(isinstance(layer, HybridWindowLayer) and layer.keys.shape[2] == 3 for layer in cache.layers)


def test_padded_generate_equals_unpadded():
    model = tm.build("llama")
    patch_model(model, "lolcats", window=3, feature_map="elu")
    ids, mask = tm.text_batch(length=9, left_pad=3)
    padded = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    alone = model.generate(ids[:1, 3:], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(padded[0, 3:], alone[0])


@pytest.mark.parametrize("name", ["llama", "vit", "clip", "dit"])
def test_full_window_equals_dense_on_decoders_and_encoders(name):
    model = tm.build(name)
    dense = tm.run(name, model)
    patch_model(model, "lolcats", window=4096)
    assert (tm.run(name, model) - dense).abs().max() <= 1e-5


def test_gate_and_feature_maps_train_save_and_reload(tmp_path):
    model = tm.build("llama")
    patch_model(model, "lolcats", window=4)
    params = trainable_parameters(model)
    gates = [k for k in params if k.endswith("attnpatch_window_gate")]
    assert len(gates) == 3 and torch.allclose(torch.sigmoid(params[gates[0]]), torch.tensor(0.1))
    ids, _ = tm.text_batch()
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())
    with torch.no_grad():
        for p in params.values():
            p.add_(0.05 * torch.randn_like(p))
    expected = tm.run("llama", model)
    save_patched(model, tmp_path / "ckpt")
    assert torch.equal(tm.run("llama", load_patched(tmp_path / "ckpt").eval()), expected)


def test_gate_init_range():
    with pytest.raises(PatchError, match=r"'gate_init' of method 'lolcats' is 1.0, out of range: float in \(0, 1\)"):
        patch_model(tm.build("llama"), "lolcats", gate_init=1.0)


@pytest.mark.parametrize("causal", [True, False])
def test_attention_weights_reproduce_the_outputs(causal):
    from attnpatch.ops.hybrid import hybrid_attention_weights
    from attnpatch.ops.linear import linear_attention_weights, naive_linear_attention
    from attnpatch.ops.reference import repeat_kv

    q, k, v, gate = inputs(19)
    fq, fk = features("hedgehog", q, k)
    valid = torch.ones(B, 19, dtype=torch.bool)
    valid[1, :3] = False
    hybrid = hybrid_attention_weights(q, k, fq, fk, gate, window=5, scaling=D**-0.5, causal=causal, key_valid=valid)
    out, _ = hybrid_attention(q, k, v, fq, fk, gate, window=5, scaling=D**-0.5, causal=causal, key_valid=valid)
    real = torch.ones(B, 1, 19, 1, dtype=torch.bool)
    real[1, :, :3] = False
    assert torch.where(real, (hybrid @ repeat_kv(v, 2) - out).abs(), 0.0).max() <= 1e-5
    assert torch.where(real[..., 0], (hybrid.sum(-1) - 1).abs(), 0.0).max() <= 1e-5
    assert (hybrid[1, :, :, :3] == 0).all()  # padding keys get no weight
    lin = linear_attention_weights(fq, fk, causal=causal, key_valid=valid)
    ref = naive_linear_attention(fq, fk, v, causal=causal, key_valid=valid)
    assert torch.where(real, (lin.double() @ repeat_kv(v, 2).double() - ref).abs(), 0.0).max() <= 1e-5


def test_attention_cross_entropy_is_softmax_entropy_when_the_window_covers_everything():
    """Hedgehog's loss -sum a log a' is minimised at a' = a, where it equals the softmax entropy."""
    from attnpatch.ops.hybrid import hybrid_attention_weights
    from attnpatch.ops.attention_weights import attention_weights
    from attnpatch.ops.reference import causal_mask
    from attnpatch.routing.dispatch import attention_cross_entropy

    q, k, v, gate = inputs(13)
    fq, fk = features("elu", q, k)
    teacher = attention_weights(q, k, causal_mask(13, 13, q.device), D**-0.5)
    covering = hybrid_attention_weights(q, k, fq, fk, gate, window=13, scaling=D**-0.5)
    assert torch.allclose(covering, teacher, atol=1e-6)
    entropy = -(teacher * teacher.clamp_min(1e-12).log()).sum(-1).mean()
    assert abs(float(attention_cross_entropy(teacher, covering)) - float(entropy)) < 1e-5
    narrow = hybrid_attention_weights(q, k, fq, fk, gate, window=2, scaling=D**-0.5)
    assert float(attention_cross_entropy(teacher, narrow)) > float(entropy) + 1e-3


def test_cross_entropy_fits_hedgehog_maps_to_softmax_weights():
    """Training Hedgehog maps and the gate on the cross-entropy alone closes most of the gap to the
    softmax weights (KL = cross-entropy - entropy), for a peaked causal softmax."""
    from attnpatch.ops.hybrid import hybrid_attention_weights
    from attnpatch.ops.attention_weights import attention_weights
    from attnpatch.ops.reference import causal_mask
    from attnpatch.routing.dispatch import attention_cross_entropy

    torch.manual_seed(0)
    q, k, _, _ = inputs(32)
    q, k = 2.5 * q, 2.5 * k
    teacher = attention_weights(q, k, causal_mask(32, 32, q.device), D**-0.5)
    entropy = float(-(teacher * teacher.clamp_min(1e-12).log()).sum(-1).mean())
    fq, fk = HedgehogFeatureMap(HQ, D), HedgehogFeatureMap(HKV, D)
    gate = torch.nn.Parameter(torch.full((HQ,), -2.0))
    optimiser = torch.optim.Adam([*fq.parameters(), *fk.parameters(), gate], lr=0.03)

    def kl():
        student = hybrid_attention_weights(q, k, fq(q, True), fk(k, False), torch.sigmoid(gate), window=4,
                                           scaling=D**-0.5)
        return attention_cross_entropy(teacher, student) - entropy

    with torch.no_grad():
        first = float(kl())
    for _ in range(150):
        loss = kl()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        last = float(kl())
    assert last < 0.5 * first, (first, last)


@pytest.mark.parametrize("name,method", [("llama", "lolcats"), ("vit", "linear")])
def test_transfer_adds_the_weighted_cross_entropy(name, method):
    """Per-layer transfer loss = MSE + attention_ce * cross-entropy (linear in the weight, at least
    the softmax entropy), with finite gradients on the trainable maps; decoder and encoder."""
    from attnpatch.runtime.modes import attention_transfer

    torch.manual_seed(0)
    model = tm.build(name)
    params = {"window": 2} if method == "lolcats" else {"feature_map": "hedgehog"}
    patch_model(model, method, **params)
    model.requires_grad_(False)
    trainable = trainable_parameters(model)
    for p in trainable.values():
        p.requires_grad_(True)
    ids, mask = tm.text_batch(left_pad=3)
    batch = {"input_ids": ids, "attention_mask": mask} if name == "llama" else {"pixel_values": tm.pixels()}

    def transfer_loss(weight):
        with attention_transfer(attention_ce=weight) as losses:
            model(**batch)
        return torch.stack(losses).mean()

    with torch.no_grad():
        mse, ce1, ce2 = (float(transfer_loss(w)) for w in (0.0, 1.0, 2.0))
    assert ce1 - mse > 1.0  # entropy of attention over >= 9 keys is well above 1 nat
    assert abs((ce2 - mse) - 2 * (ce1 - mse)) < 1e-4 * ce2
    transfer_loss(1.0).backward()
    grads = [p.grad for p in trainable.values() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    with pytest.raises(ValueError, match="attention_ce"):
        with attention_transfer(attention_ce=-1.0):
            pass


@pytest.mark.parametrize("name", ["llama", "vit"])
def test_unpatch_removes_gates_and_maps(name):
    model = tm.build(name)
    keys = list(model.state_dict())
    before = tm.run(name, model)
    patch_model(model, "lolcats", window=2)
    assert any("attnpatch_window_gate" in k for k in model.state_dict())
    from attnpatch import unpatch_model

    unpatch_model(model)
    assert list(model.state_dict()) == keys
    assert not any(n.startswith("attnpatch_") for m in model.modules() for n in vars(m).get("_parameters", {}))
    assert torch.equal(tm.run(name, model), before)
