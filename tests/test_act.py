"""act (attention calibration): the blocked op against the definition on full weight matrices,
identity at beta = 1, only the chosen heads change, padding independence, save/load, errors, and
calibrate_act's per-head effect against a finite difference."""

import pytest
import tiny_models as tm
import torch

from attnpatch import PatchConfig, PatchError, load_patched, patch_model, save_patched, unpatch_model
from attnpatch.analysis.act_calibration import calibrate_act, choice_scores
from attnpatch.api import patched_methods
from attnpatch.ops.reference import causal_mask, repeat_kv
from attnpatch.ops.sink_recalibration import sink_calibrated_attention
from method_cases import MatrixCase

MATRIX_CASES = {"act": MatrixCase(["llama", "vit"], {"alpha": 1.0, "block_size": 4})}


def definition(q, k, v, valid, beta, alpha, causal):
    """ACT on the full (Lq, Lk) weight matrix of each sequence and head, written loop by loop."""
    b, h, lq, _ = q.shape
    k, v = repeat_kv(k, h // k.shape[1]), repeat_kv(v, h // v.shape[1])
    out = torch.zeros_like(q)
    for s in range(b):
        real = valid[s].nonzero().flatten()
        for head in range(h):
            scores = (q[s, head] @ k[s, head].T) / q.shape[-1] ** 0.5
            allowed = valid[s][None, :].expand(lq, -1).clone()
            if causal:
                allowed &= causal_mask(lq, k.shape[-2], None)
            weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
            queries = valid[s][k.shape[-2] - lq:]
            mean_received = weights[queries].sum(0) / queries.sum()
            sinks = (mean_received > alpha / len(real)) & valid[s]
            sinks[real[0]] = False
            new = weights.clone()
            for i in range(lq):
                mass = weights[i, sinks].sum()
                if mass < 1 - 1e-6:
                    new[i, sinks] = beta * weights[i, sinks]
                    new[i, ~sinks] = weights[i, ~sinks] * (1 - beta * mass) / (1 - mass)
            out[s, head] = new @ v[s, head]
    return out


@pytest.mark.parametrize("causal", [True, False])
def test_op_matches_the_definition(causal):
    g = torch.Generator().manual_seed(0)
    b, hq, hkv, n, d = 2, 4, 2, 40, 16
    q, k, v = (torch.randn(b, h, n, d, generator=g) for h in (hq, hkv, hkv))
    shared = torch.randn(d, generator=g)
    q += shared
    k[:, :, [5, 17]] = 0.6 * shared  # keys every query likes: hidden sinks
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[1, :6] = False  # left padding in the second sequence
    allowed = valid[:, None, None, :] & (causal_mask(n, n, None) if causal else True)
    got = sink_calibrated_attention(q, k, v, allowed, d ** -0.5, beta=0.4, alpha=2.0, key_valid=valid, block=7)
    want = definition(q, k, v, valid, 0.4, 2.0, causal)
    rows = valid[:, None, :, None]
    assert torch.allclose(got * rows, want * rows, atol=1e-5)
    plain = sink_calibrated_attention(q, k, v, allowed, d ** -0.5, beta=1.0, alpha=2.0, key_valid=valid)
    assert (got - plain).abs().max() > 1e-2  # sinks were found and moved


def sharpened(name):
    """A tiny model whose query projections are scaled up, so attention is peaked (random init is
    nearly uniform and has no sinks to find)."""
    model = tm.build(name)
    with torch.no_grad():
        for path, param in model.named_parameters():
            if path.endswith(("q_proj.weight", "query.weight")):
                param.mul_(30.0)
    return model


@pytest.mark.parametrize("name", ["llama", "qwen3", "vit", "clip"])
def test_beta_one_is_the_identity(name):
    model = sharpened(name)
    dense = tm.run(name, model)
    patch_model(model, "act", beta=1.0, alpha=1.2)
    assert torch.allclose(tm.run(name, model), dense, atol=1e-5)
    unpatch_model(model)
    patch_model(model, "act", beta=0.2, alpha=1.2)
    assert (tm.run(name, model) - dense).abs().max() > 1e-3
    unpatch_model(model)
    assert torch.equal(tm.run(name, model), dense)


def test_only_the_chosen_heads_change(tmp_path):
    model = tm.build("llama")
    attention = model.model.layers[2].self_attn
    captured = {}
    hook = attention.o_proj.register_forward_pre_hook(lambda m, a: captured.__setitem__("x", a[0].detach()))
    tm.run("llama", model)
    dense = captured["x"].unflatten(-1, (4, 16))
    config = PatchConfig("act", {"beta": 0.0, "alpha": 1.2}, layers=[2], layer_params={2: {"heads": [1, 2]}})
    patch_model(model, config)
    logits = tm.run("llama", model)
    calibrated = captured["x"].unflatten(-1, (4, 16))
    hook.remove()
    assert torch.allclose(calibrated[..., [0, 3], :], dense[..., [0, 3], :], atol=1e-6)
    assert (calibrated[..., [1, 2], :] - dense[..., [1, 2], :]).abs().max() > 1e-3
    save_patched(model, tmp_path)
    assert torch.allclose(tm.run("llama", load_patched(tmp_path)), logits, atol=1e-6)


def test_left_padding_matches_each_sequence_alone():
    model = patch_model(tm.build("llama"), "act", beta=0.3, alpha=1.2)
    ids, mask = tm.text_batch(left_pad=4)
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask).logits
        alone = model(input_ids=ids[:1, 4:]).logits
        second = model(input_ids=ids[1:]).logits
    assert torch.allclose(batch[0, 4:], alone[0], atol=1e-5)
    assert torch.allclose(batch[1], second[0], atol=1e-5)


def test_errors():
    with pytest.raises(PatchError, match="beta"):
        patch_model(tm.build("llama"), "act", beta=1.5)
    with pytest.raises(PatchError, match="out of range for model.layers"):
        patch_model(tm.build("llama"), PatchConfig("act", layer_params={0: {"heads": [7]}}))
    model = patch_model(tm.build("llama"), "act")
    with pytest.raises(PatchError, match="unpatched model"):
        calibrate_act(model, None, [{"context": "a", "choices": ["b"], "label": 0}])


class WordTokenizer:
    """Words -> ids of the tiny vocabulary (deterministic), enough for multiple-choice scoring."""

    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        class Out:
            input_ids = [3 + sum(map(ord, w)) % (tm.V - 6) for w in text.split()]
        return Out()


def _items(count=6):
    words = ["red", "blue", "cat", "dog", "sun", "tree", "river", "stone", "bird", "cloud"]
    return [{"context": " ".join(words[(i + j) % 10] for j in range(8)),
             "choices": [" ".join(words[(i * c + j) % 10] for j in range(3)) for c in range(1, 4)], "label": i % 3}
            for i in range(count)]


def test_calibration_effect_is_the_derivative_and_the_search_keeps_the_best():
    model = tm.build("llama")
    tokenizer, items = WordTokenizer(), _items()
    calibration = calibrate_act(model, tokenizer, items, beta=0.2, alpha=1.2, progress=False)
    assert calibration.effect.shape == (3, 4)
    base = calibration.search[0]
    assert base["heads"] == 0 and base["loss"] == pytest.approx(choice_scores(model, tokenizer, items).loss, abs=1e-6)
    # finite difference of the loss in one head's strength (mixing exact and calibrated output)
    layer, head = divmod(int(calibration.effect.abs().argmax()), 4)
    patch_model(model, PatchConfig("act", {"beta": 0.2, "alpha": 1.2}, layers=[layer]))
    method = patched_methods(model)[0]
    eps = 0.02  # central difference: O(eps^2) error, well above float32 rounding of the loss
    losses = []
    for sign in (1, -1):
        method.strength = torch.zeros(4)
        method.strength[head] = sign * eps
        losses.append(choice_scores(model, tokenizer, items).loss)
    method.strength = None
    unpatch_model(model)
    slope = (losses[0] - losses[1]) / (2 * eps)
    assert slope == pytest.approx(float(calibration.effect[layer, head]), rel=0.02, abs=1e-5)
    ranked = calibration.ranked
    assert ranked and all(float(calibration.effect[l, h]) < 0 for l, h in ranked)
    tried = [row for row in calibration.search if row["heads"] > 0]
    assert [row["heads"] for row in tried][-1] == len(ranked)
    best = min(calibration.search, key=lambda r: r["loss"])
    if best["heads"] > 0:  # the chosen config reproduces the searched loss
        patch_model(model, calibration.config())
        assert choice_scores(model, tokenizer, items).loss == pytest.approx(best["loss"], abs=1e-6)
        unpatch_model(model)
    config = calibration.config(1)
    (layer, head), = [(layer, p["heads"][0]) for layer, p in config.layer_params.items()]
    assert (layer, head) == ranked[0] and config.layers == [layer]


def test_calibration_never_chooses_a_head_that_writes_nothing():
    """Planted structure: layer 1's head 2 has a zero output projection, so calibrating it changes no
    output: its measured effect is exactly 0 and the search never includes it, while heads that write
    do have effects."""
    model = tm.build("llama")
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.unflatten(1, (4, 16))[:, 2] = 0
    calibration = calibrate_act(model, WordTokenizer(), _items(), beta=0.2, alpha=1.2, progress=False)
    assert float(calibration.effect[1, 2]) == 0.0
    assert (1, 2) not in calibration.ranked
    assert int((calibration.effect != 0).sum()) == calibration.effect.numel() - 1
