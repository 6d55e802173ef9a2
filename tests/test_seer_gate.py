"""seer_gate: the gate and its target against loop-by-loop references, block_topk's density at the same
top_k, exact when every block is kept, self-distillation raises the attention mass the chosen blocks
hold, save/reload, encoders."""

import math

import pytest
import tiny_models as tm
import torch

from attnpatch import PatchError, load_patched, patch_model, patched_methods, save_patched, unpatch_model
from attnpatch.ops.seer_gate import block_attention_target, gate_distillation_loss, gate_log_probs
from attnpatch.ops.block_selection import block_topk
from attnpatch.runtime.modes import attention_transfer
from method_cases import MatrixCase, sparse_kernel_skipped_blocks

MATRIX_CASES = {"seer_gate": MatrixCase(["llama", "vit"], {"block_size": 4, "top_k": 1}, check=sparse_kernel_skipped_blocks)}


def test_gate_and_target_match_loop_references():
    torch.manual_seed(0)
    # 7 new queries after 4 cached keys: query i sits at position 4 + i, blocks start at key 0
    b, hq, hkv, lq, lk, d, g, bs = 1, 4, 2, 7, 11, 6, 5, 4
    q, k = torch.randn(b, hq, lq, d), torch.randn(b, hkv, lk, d)
    wq, wk = torch.randn(hq, d, g), torch.randn(hkv, 3 * d, g)
    got = gate_log_probs(q, k, wq, wk, bs, causal=True)
    nk = math.ceil(lk / bs)
    first = (lk - lq) // bs

    def rows_of(r):  # the call's queries inside absolute query block first + r
        return [i for i in range(lq) if (lk - lq + i) // bs == first + r]

    assert got.shape[-2:] == (nk - first, nk)
    for h in range(hq):
        for r in range(nk - first):
            qg = q[0, h, rows_of(r)].mean(0) @ wq[h]
            logits = []
            for kb in range(first + r + 1):
                keys = k[0, h // 2, kb * bs:min((kb + 1) * bs, lk)]
                kg = torch.cat([keys.amax(0), keys.amin(0), keys.mean(0)]) @ wk[h // 2]
                logits.append(float(qg @ kg) / math.sqrt(g))
            expected = torch.tensor(logits).log_softmax(0)
            assert torch.allclose(got[0, h, r, :first + r + 1], expected, atol=1e-5)
            assert (got[0, h, r, first + r + 1:] < -1e8).all()
    positions = torch.arange(lk - lq, lk)[:, None]
    weights = torch.rand(b, hq, lq, lk) * (torch.arange(lk)[None] <= positions)
    weights = weights / weights.sum(-1, keepdim=True)
    target = block_attention_target(weights, bs, causal=True)
    for r in range(nk - first):
        tile = torch.tensor([float(weights[0, 0, rows_of(r), kb * bs:(kb + 1) * bs].max()) for kb in range(nk)])
        assert torch.allclose(target[0, 0, r], tile / tile.sum(), atol=1e-6)
    kl = gate_distillation_loss(got, target)
    rows = (nk - first) * hq
    direct = sum(float((t[t > 0] * (t[t > 0].log() - p[t > 0])).sum())
                 for t, p in zip(target.reshape(-1, nk), got.reshape(-1, nk))) / rows
    assert kl.item() == pytest.approx(direct, rel=1e-5)


def test_a_trained_gate_finds_the_blocks_mean_pooling_misses():
    """Key blocks 2 and 5 each hide one key aligned with every query next to one opposed to it: their
    means show nothing, so block_topk's mean-pooled scoring cannot tell them apart, while the keys'
    max and min (which the gate sees) do. Self-distillation finds them and the chosen blocks hold
    far more of the attention."""
    g = torch.Generator().manual_seed(0)
    heads, length, d, bs = 2, 64, 8, 8
    direction = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    query = 0.3 * torch.randn(1, heads, length, d, generator=g) + 2.0 * direction
    key = 0.3 * torch.randn(1, heads, length, d, generator=g)
    for block in (2, 5):
        key[..., block * bs + 1, :] = 6.0 * direction
        key[..., block * bs + 2, :] = -6.0 * direction
    scaling = d ** -0.5
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    weights = (query @ key.transpose(-1, -2) * scaling).masked_fill(~causal, float("-inf")).softmax(-1)
    target = block_attention_target(weights, bs, causal=True)

    def mass(layout):
        keep = layout.block_mask().repeat_interleave(bs, dim=-2).repeat_interleave(bs, dim=-1)
        return float((weights * keep).sum(-1)[..., 6 * bs:].mean())  # query blocks 6 and 7: both needles behind

    def chosen(scores=None):
        return block_topk(query, key, bs, causal=True, top_k=2, sink_blocks=1, local_blocks=1, scores=scores)

    gate_query = torch.eye(d).expand(heads, d, d).clone().requires_grad_(True)  # the method's start
    gate_key = torch.cat([torch.zeros(2 * d, d), torch.eye(d)]).expand(heads, 3 * d, d).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([gate_query, gate_key], lr=0.05)
    for _ in range(150):
        loss = gate_distillation_loss(gate_log_probs(query, key, gate_query, gate_key, bs, causal=True), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        probs = gate_log_probs(query, key, gate_query, gate_key, bs, causal=True).exp()
    layout = chosen(probs.masked_fill(probs <= 0, float("-inf")))
    assert layout.block_mask()[0, :, 6:, [2, 5]].all()  # both needle blocks, for every head
    assert mass(layout) > mass(chosen()) + 0.2, (mass(layout), mass(chosen()))


def test_self_distillation_trains_the_gate_and_the_gate_reloads(tmp_path):
    model = tm.build("llama")
    ids = torch.randint(3, tm.V - 2, (2, 64), generator=torch.Generator().manual_seed(0))
    dense = model(input_ids=ids).logits
    patch_model(model, "seer_gate", block_size=8, top_k=100)
    assert torch.allclose(model(input_ids=ids).logits, dense, atol=1e-5)  # every block kept: exact
    unpatch_model(model)
    patch_model(model, "block_topk", block_size=8, top_k=2)
    model(input_ids=ids)
    topk_density = [m.last_density for m in patched_methods(model)]
    unpatch_model(model)
    patch_model(model, "seer_gate", block_size=8, top_k=2)
    model(input_ids=ids)
    assert [m.last_density for m in patched_methods(model)] == topk_density  # same budget, same density
    for p in model.parameters():
        p.requires_grad_(False)
    gates = [p for n, p in model.named_parameters() if "attnpatch_gate" in n]
    for p in gates:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(gates, lr=0.02)
    first = None
    for _ in range(20):
        with attention_transfer() as losses:
            model(input_ids=ids, use_cache=False)
        loss = sum(losses)
        first = float(loss.detach()) if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert len(losses) == 3 and float(loss.detach()) < 0.5 * first
    trained = model(input_ids=ids).logits
    save_patched(model, tmp_path / "seer")
    reloaded = load_patched(tmp_path / "seer").eval()
    assert torch.allclose(reloaded(input_ids=ids).logits, trained, atol=1e-6)


def test_threshold_and_encoders_and_errors():
    model = tm.build("vit")
    dense = tm.run("vit", model)
    patch_model(model, "seer_gate", block_size=4, threshold=1.0)  # only the local and sink blocks reach it
    out = tm.run("vit", model)
    method = patched_methods(model)[0]
    assert method.calls > 0 and method.last_density < 1 and (out - dense).abs().max() > 1e-4
    unpatch_model(model)
    patch_model(model, "seer_gate", block_size=4, threshold=1e-9)  # every block reaches it: exact
    assert torch.allclose(tm.run("vit", model), dense, atol=1e-5)
    unpatch_model(model)
    with pytest.raises(PatchError, match="threshold"):
        patch_model(model, "seer_gate", threshold=0.0)
    assert torch.equal(tm.run("vit", model), dense)
