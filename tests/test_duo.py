"""duo_heads (DuoAttention): per-head full vs sinks+window attention against naive attention under
the per-head mask, cached decoding equal to full recomputation, cache bytes equal to the pattern,
gate training and the saved per-layer pattern."""

import pytest
import tiny_models as tm
import torch
from transformers import DynamicCache

from attnpatch import PatchError, cache_nbytes, load_patched, patch_model, patched_methods, save_patched, unpatch_model
from attnpatch.analysis.duo_training import passkey_batches, train_duo_heads
from attnpatch.ops.reference import naive_attention
from attnpatch.runtime.call import AttentionCall
from method_cases import MatrixCase

MATRIX_CASES = {"duo_heads": MatrixCase(["llama"], {"sinks": 1, "window": 4}, cache_layer="DuoHeadLayer",
                                        patch={"layer_params": {0: {"retrieval_heads": [1]}}})}

PATTERN = {0: {"retrieval_heads": [1]}, 2: {"retrieval_heads": [0]}}  # layer 1: both kv heads stream


def ids(length=40, seed=0):
    return torch.randint(3, tm.V - 2, (1, length), generator=torch.Generator().manual_seed(seed))


def test_attention_equals_naive_attention_under_the_per_head_mask():
    model = tm.build("llama")
    patch_model(model, "duo_heads", sinks=2, window=5, layer_params={0: {"retrieval_heads": [1]}})
    method = patched_methods(model)[0]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 23, 16, generator=g) for h in (4, 2, 2))
    call = AttentionCall(module=model.model.layers[0].self_attn, query=q, key=k, value=v, mask=None, causal=True,
                         scaling=0.25)
    # written out here: query head h belongs to kv head h // 2; kv head 1 retrieves (every earlier key), kv
    # head 0 streams (the 2 sinks and the 5 nearest keys, itself included)
    mask = torch.tensor([[[j <= i and (h // 2 == 1 or j < 2 or i - j < 5) for j in range(23)] for i in range(23)]
                         for h in range(4)])
    expected = naive_attention(q, k, v, mask[None], scaling=0.25)
    assert torch.allclose(method.attention(call), expected, atol=1e-5)


def test_all_retrieval_is_dense_and_all_streaming_is_sliding_window():
    model = tm.build("llama")
    x = ids()
    dense = tm.run("llama", model), model(x).logits
    patch_model(model, "duo_heads", sinks=2, window=6, layer_params={i: {"retrieval_heads": [0, 1]} for i in range(3)})
    assert torch.allclose(model(x).logits, dense[1], atol=1e-5)
    assert torch.allclose(tm.run("llama", model, left_pad=3), tm.run("llama", unpatch_model(model), left_pad=3),
                          atol=1e-5)
    patch_model(model, "sliding_window", sinks=2, window=6)
    window = model(x).logits
    unpatch_model(model)
    patch_model(model, "duo_heads", sinks=2, window=6)
    assert torch.allclose(model(x).logits, window, atol=1e-5)
    unpatch_model(model)
    assert torch.equal(tm.run("llama", model), dense[0])


@pytest.mark.parametrize("sinks,window,sliding_window,padded", [(2, 5, None, False), (0, 4, None, False),
                                                                 (3, 6, 4, False), (2, 5, None, True), (1, 3, 7, True)])
def test_trim_keeps_exactly_the_sinks_and_window_of_its_definition(sinks, window, sliding_window, padded):
    """After updates of 1-5 tokens, the streaming store holds the positions p among some row's first `sinks`
    real tokens or with p > seen - window and, under the model's own window, p > seen - that window,
    and each kept key is the one stored at p; a store of every head is kept as the states came."""
    from attnpatch.ops.token_ranks import leading_invalid
    from attnpatch.runtime.layers import DuoHeadLayer

    g = torch.Generator().manual_seed(sinks + window)
    for streaming in ([0, 1], [1]):
        layer = DuoHeadLayer([0] if streaming == [1] else [], streaming, sinks, window, sliding_window)
        states = []
        for n in (5, 1, 3, 1, 1, 2, 1, 4, 1):
            k = torch.randn(2, 2, n, 4, generator=g)
            layer.update(k, -k)
            states.append(k)
            if padded and len(states) == 1:  # row 0 left-padded by 2 tokens
                layer.mark_new_padding(torch.tensor([[False, False, True, True, True], [True] * 5]))
            layer.trim()
            seen = layer.seen_tokens
            positions = torch.arange(seen)
            sink = torch.zeros(seen, dtype=torch.bool)
            for first in leading_invalid(layer.valid).tolist():  # each row's own first `sinks` real tokens
                sink |= (positions >= first) & (positions < first + sinks)
            keep = sink | (positions > seen - window)
            if sliding_window is not None:
                keep &= positions > seen - sliding_window
            assert layer.stream_positions.tolist() == positions[keep].tolist()
            every = torch.cat(states, dim=-2)[:, streaming]
            assert torch.equal(layer.stream_keys, every[:, :, keep]) and torch.equal(layer.stream_values, -every[:, :, keep])
            assert layer.padded == padded and layer.trimmed_at == seen


def test_cached_decoding_matches_full_recomputation_and_cache_bytes_match_the_pattern():
    model = tm.build("llama")
    patch_model(model, "duo_heads", sinks=2, window=6, layer_params=PATTERN)
    x = ids(40)
    with torch.no_grad():
        full = model(x, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        steps = [model(x[:, :25], past_key_values=cache).logits[:, -1]]
        for t in range(25, 39):
            steps.append(model(x[:, t:t + 1], past_key_values=cache).logits[:, -1])
    assert torch.allclose(torch.stack(steps, 1), full[:, 24:39], atol=1e-5)
    # 39 tokens seen; retrieval kv heads hold all, streaming ones 2 sinks + the 5 newest (window - 1)
    per_token = 16 * 2 * 4  # head_dim x (k, v) x float32
    retrieval = [1, 0, 1]
    expected = sum(r * 39 * per_token + (2 - r) * (2 + 5) * per_token for r in retrieval)
    bookkeeping = 3 * ((2 + 5) * 8 + 39)  # per layer: streaming positions (int64) and validity (bool)
    assert cache_nbytes(cache) == expected + bookkeeping
    dense_bytes = 3 * 2 * 39 * per_token
    assert cache_nbytes(cache) < dense_bytes / 2
    generated = model.generate(x[:, :20], max_new_tokens=6, do_sample=False)
    # decoding through the trimmed cache picks what the full pattern over the whole sequence picks
    with torch.no_grad():
        full = model(input_ids=generated[:, :-1], use_cache=False).logits
    assert torch.equal(full[:, 19:].argmax(-1), generated[:, 20:])


def test_left_padded_batch_decodes_like_each_sequence_alone():
    model = tm.build("llama")
    patch_model(model, "duo_heads", sinks=2, window=6, layer_params=PATTERN)
    a, b = ids(20, 1), ids(16, 2)
    batch = torch.zeros(2, 20, dtype=torch.long)
    batch[0], batch[1, 4:] = a[0], b[0]
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :4] = 0
    with torch.no_grad():
        together = model.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False)[:, 20:]
        alone = model.generate(a, max_new_tokens=5, do_sample=False)[:, 20:]
    assert torch.equal(together[0], alone[0])


def test_pattern_saves_and_errors_are_clear(tmp_path):
    model = tm.build("llama")
    patch_model(model, "duo_heads", sinks=2, window=6, layer_params=PATTERN)
    expected = tm.run("llama", model)
    save_patched(model, tmp_path)
    assert torch.allclose(tm.run("llama", load_patched(tmp_path)), expected, atol=1e-6)
    with pytest.raises(PatchError, match=r"retrieval_heads \[2\] are out of range .* 2 kv heads"):
        patch_model(tm.build("llama"), "duo_heads", layer_params={1: {"retrieval_heads": [2]}})
    with pytest.raises(PatchError, match="supports \\['decoder'\\]"):
        patch_model(tm.build("vit"), "duo_heads")


def test_gate_training_lowers_gates_and_builds_patterns():
    model = tm.build("llama")
    batches = [ids(48, s) for s in range(3)]
    calibration = train_duo_heads(model, batches, sinks=2, window=8, steps=25, lr=0.05, l1=0.05, supervise=8,
                                  progress=False)
    assert calibration.gates.shape == (3, 2)
    assert bool((calibration.gates < 1).all()) and bool((calibration.gates >= 0).all())
    assert calibration.history[0][1] == 0.0  # gates start at 1: the mixed model is the full model
    assert not model.__dict__.get("_attnpatch_record") and all(p.requires_grad for p in model.parameters())
    half = calibration.config(retrieval_ratio=0.5)
    assert calibration.retrieval_fraction(half) == 0.5
    top = calibration.gates.flatten().argsort(descending=True, stable=True)[:3].tolist()
    assert sorted((layer * 2 + h) for layer, p in half.layer_params.items() for h in p["retrieval_heads"]) == sorted(top)
    patch_model(model, half)
    with pytest.raises(PatchError, match="exactly one of retrieval_ratio"):
        calibration.config()
    tokens = passkey_batches(tm.tiny_tokenizer(), 2, 64)
    assert len(tokens) == 2 and abs(tokens[0].shape[-1] - 64) <= 8


def test_gate_training_keeps_the_head_built_to_retrieve():
    """Planted structure: in every layer kv head 0's query heads write nothing (their output-projection
    columns are zero), so streaming them costs nothing; kv head 1 carries all attention output, so
    cutting it to sinks + window changes the model. The gates must keep head 1 and let head 0 go."""
    model = tm.build("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.unflatten(1, (4, 16))[:, :2] = 0  # query heads 0, 1: kv head 0's group
    batches = [ids(48, s) for s in range(3)]
    calibration = train_duo_heads(model, batches, sinks=2, window=8, steps=25, lr=0.05, l1=0.05, supervise=8,
                                  progress=False)
    gates = calibration.gates
    assert bool((gates[:, 1] > gates[:, 0] + 0.2).all()), gates
    kept = calibration.config(retrieval_ratio=0.5).layer_params
    assert all(params["retrieval_heads"] == [1] for params in kept.values()), kept
