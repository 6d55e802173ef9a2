"""KV-cache compression: selections against slow references, generate() on padded batches,
measured cache bytes against the budget, and budget >= length equal to dense."""

import math

import pytest
import tiny_models as tm
import torch
from transformers import DynamicCache

from attnpatch import cache_kwargs, cache_nbytes, patch_model, patched_methods, unpatch_model
from attnpatch.registry import get_method, resolve_params
from attnpatch.runtime.call import AttentionCall
from attnpatch.runtime.layers import CompressedKVLayer
from method_cases import MatrixCase, MatrixRun

def entries_held_match_the_budget(run: MatrixRun) -> None:
    """Each row and kv head holds floor((1 - compression) x its real prompt tokens) entries, plus every
    decoded token where the method grows (decode='grow'), none where it holds (decode='hold')."""
    method = patched_methods(run.model)[0]
    config = method.config
    grown = run.steps if config["decode"] == "grow" else 0
    budgets = [max(1, math.floor(n * (1 - config["compression"]))) + grown for n in run.prompt_lengths]
    for layer in run.cache.layers:
        assert layer.valid.sum(-1).tolist() == [[b] * layer.valid.shape[1] for b in budgets], (method.name, budgets)


MATRIX_CASES = {
    **{name: MatrixCase(["llama"], params, cache_layer="CompressedKVLayer", check=entries_held_match_the_budget)
       for name, params in {
           "streaming": {"compression": 0.5, "sinks": 2}, "h2o": {"compression": 0.5}, "tova": {"compression": 0.5},
           "knorm": {"compression": 0.5}, "keydiff": {"compression": 0.5},
           "snapkv": {"compression": 0.5, "window": 4, "kernel": 3}}.items()},
    # kvzip compresses through compress_context (another prompt in each matrix test) and pyramidkv's budgets
    # differ per layer: tests/test_contexts.py and test_pyramidkv_budgets_decrease_with_depth hold theirs
    **{name: MatrixCase(["llama"], params, cache_layer="CompressedKVLayer") for name, params in {
        "kvzip": {"compression": 0.5, "chunk": 8}, "pyramidkv": {"compression": 0.5, "window": 4, "kernel": 3}}.items()},
    # kv_quant's 4-bit codes move by a whole step (1/15 of a group's range) when a value crosses a boundary
    "kv_quant": MatrixCase(["llama"], {"group": 8, "residual": 2, "sinks": 1, "bits": 4}, cache_layer="QuantizedKVLayer",
                           half_precision_tolerance=0.03),
}
# tiny random keys have near-equal norms, and knorm evicts by key norm: rounding flips its choices
MATRIX_CASES["knorm"].half_precision_tolerance = 0.25

B, HQ, HKV, D, L = 2, 4, 2, 8, 24
PAD = 5  # sequence 0 is left-padded by 5 tokens
METHODS = ["streaming", "h2o", "tova", "knorm", "snapkv", "pyramidkv", "keydiff"]


class Site:
    layer, num_layers, num_heads, num_kv_heads, head_dim = 0, 4, HQ, HKV, D


def prefill_once(method: str, seed: int = 0, layer: int = 0, **params):
    """Run one method's prefill on random q/k/v through a fresh CompressedKVLayer."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(B, HQ, L, D, generator=g), torch.randn(B, HKV, L, D, generator=g), torch.randn(B, HKV, L, D, generator=g)
    cache = CompressedKVLayer()
    keys, values = cache.update(k, v)
    mask = torch.ones(B, 1, L, L, dtype=torch.bool).tril()
    mask[0, :, :, :PAD] = False
    site = Site()
    site.layer = layer
    instance = get_method(method)(site, **resolve_params(method, params))
    call = AttentionCall(module=None, query=q, key=keys, value=values, mask=mask, causal=True, scaling=D**-0.5,
                         cache_layer=cache)
    instance.attention(call)
    return cache, q, k


def full_attention(q, k, b):
    """(HQ, L, L) causal softmax attention of sequence b, padding excluded: the slow way."""
    scores = torch.einsum("hqd,hkd->hqk", q[b].double(), k[b].repeat_interleave(HQ // HKV, 0).double()) * D**-0.5
    allowed = torch.ones(L, L).tril().bool()
    if b == 0:
        allowed[:, :PAD] = False
    weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1)
    return torch.nan_to_num(weights)


def reference_keep(scores, b, head, budget, sinks=0, recent=0):
    """Kept positions of one (sequence, kv head): the first `sinks` real tokens and the `recent`
    newest are forced, the rest of the budget goes to the best scores."""
    positions = list(range(PAD if b == 0 else 0, L))
    keep = min(budget, len(positions))
    forced = positions[:sinks] + (positions[len(positions) - recent:] if recent else [])
    forced = sorted(set(forced))[:keep]
    rest = sorted((p for p in positions if p not in forced), key=lambda p: -float(scores[p]))
    return sorted(forced + rest[: keep - len(forced)])


def kept_positions(cache, b, head):
    return sorted(cache.positions[b, head][cache.valid[b, head]].tolist())


def group_sum(weights):  # (HQ, ...) -> (HKV, ...)
    return weights.reshape(HKV, HQ // HKV, *weights.shape[1:]).sum(1)


@pytest.mark.parametrize("method,params", [
    ("h2o", {"budget": 9, "recent_ratio": 0.34}),
    ("h2o", {"compression": 0.5, "recent_ratio": 0.0}),
    ("tova", {"budget": 7}),
    ("knorm", {"budget": 6, "sinks": 2}),
    ("keydiff", {"budget": 7}),
    ("snapkv", {"budget": 10, "window": 4, "kernel": 1}),
    ("snapkv", {"budget": 10, "window": 4, "kernel": 5, "pooling": "max"}),
    ("streaming", {"budget": 8, "sinks": 2}),
])
def test_prefill_selection_matches_slow_reference(method, params):
    cache, q, k = prefill_once(method, **params)
    config = resolve_params(method, params)
    for b in range(B):
        real = L - PAD if b == 0 else L
        budget = config["budget"] or max(1, int(real * (1 - config["compression"])))
        weights = full_attention(q, k, b)
        for head in range(HKV):
            if method == "h2o":
                scores, recent = group_sum(weights.sum(1))[head], int(budget * config["recent_ratio"])
            elif method == "tova":  # the last query's attention, averaged over the layer's heads
                scores, recent = group_sum(weights[:, -1]).mean(0), 0
            elif method == "knorm":
                scores, recent = -k[b, head].double().norm(dim=-1), 0
            elif method == "keydiff":  # negative cosine to the mean of the real unit keys
                unit = torch.nn.functional.normalize(k[b, head].double(), dim=-1)
                anchor = unit[(PAD if b == 0 else 0):].mean(0)
                scores, recent = -torch.nn.functional.cosine_similarity(unit, anchor[None], dim=-1), 0
            elif method == "snapkv":
                raw = group_sum(weights[:, -config["window"]:].sum(1))[head]
                kern = config["kernel"]
                pooled = []
                first, last = (PAD if b == 0 else 0), L - config["window"]  # the prefix: real, before the window
                for i in range(L):  # 1-D pooling over real prefix neighbours, the slow way
                    span = raw[max(first, i - kern // 2): min(last, i + kern // 2 + 1)] if first <= i < last else raw[i:i + 1]
                    pooled.append(span.max() if config["pooling"] == "max" else span.mean())
                scores, recent = torch.stack(pooled), config["window"]
            else:
                scores, recent = torch.zeros(L), budget - config["sinks"]
            expected = reference_keep(scores, b, head, budget, config["sinks"], recent)
            assert kept_positions(cache, b, head) == expected, (method, b, head)
    # stored entries shrink to the largest per-sequence budget
    assert cache.keys.shape[2] == max(config["budget"] or 0, max(
        max(1, int(n * (1 - config["compression"]))) for n in (L - PAD, L)) if config["budget"] is None else 0)


def test_pyramidkv_budgets_decrease_with_depth():
    kept = []
    for layer in range(4):
        cache, _, _ = prefill_once("pyramidkv", layer=layer, budget=8, window=2, spread=0.5)
        kept.append(int(cache.valid[1, 0].sum()))
    assert kept == [12, 9, 7, 4] and sum(kept) / 4 == pytest.approx(8, abs=0.1)


def _generate(model, method=None, new_tokens=6, **params):
    if method:
        patch_model(model, method, **params)
    ids, mask = tm.text_batch(length=20, left_pad=4)
    cache = DynamicCache(config=model.config)
    out = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    if method:
        unpatch_model(model)
    return out, cache


@pytest.mark.parametrize("method", METHODS)
def test_generate_padded_batch_budget_and_bytes(method):
    model = tm.build("llama")
    dense, dense_cache = _generate(model)
    full, _ = _generate(model, method, budget=64)  # budget >= length: dense, up to float rounding
    assert torch.equal(full.sequences, dense.sequences)  # (SDPA's GQA kernels differ in the last bits)
    assert max((a - b).abs().max().item() for a, b in zip(full.scores, dense.scores)) <= 1e-4
    extra = {"window": 3} if method in ("snapkv", "pyramidkv") else {}
    out, cache = _generate(model, method, budget=8, **extra)
    cfg = model.config
    grows = method in ("snapkv", "pyramidkv", "knorm", "keydiff")  # decode="grow" by default (their papers)
    for i, layer in enumerate(cache.layers):
        assert isinstance(layer, CompressedKVLayer)
        # a held cache stores its budget plus one slot, where each step writes its token before evicting
        expected = (layer.policy.budget.max().item() if grows else 8 + 1)
        if not grows:
            assert layer.valid[:, 0].sum(-1).tolist() == [8, 8]  # per sequence, padding never kept
        assert layer.keys.shape == (2, cfg.num_key_value_heads, expected, 16)
    kv_bytes = sum(l.keys.numel() * 4 + l.values.numel() * 4 for l in cache.layers)
    if grows:  # + the grown buffers' headroom (1/16 of their size, at least 1 slot) and small metadata
        headroom = 2 * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * 2 * 16 * 4
        assert kv_bytes <= cache_nbytes(cache) < 1.1 * (kv_bytes + headroom)
    else:  # allocated exactly: no headroom
        assert kv_bytes == 2 * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * 9 * 16 * 4
        assert kv_bytes <= cache_nbytes(cache) < 1.1 * kv_bytes
    assert out.sequences.shape == dense.sequences.shape


@pytest.mark.parametrize("method", ["streaming", "h2o", "snapkv"])
def test_padded_sequence_equals_running_alone(method):
    """Selection is per sequence: the padded row generates what it generates without padding."""
    model = tm.build("llama")
    patch_model(model, method, budget=6, **({"window": 2} if method == "snapkv" else {}))
    ids, mask = tm.text_batch(length=20, left_pad=4)
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    alone = model.generate(ids[:1, 4:], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(batch[0, 4:], alone[0])


@pytest.mark.parametrize("name", ["mistral", "qwen2", "qwen3", "gemma2", "phi3"])
def test_every_decoder_family(name):
    model = tm.build(name)
    dense, _ = _generate(model)
    for method in ("h2o", "snapkv"):
        full, _ = _generate(model, method, budget=64)
        assert torch.equal(full.sequences, dense.sequences), (name, method)
        _, cache = _generate(model, method, budget=5, **({"window": 2} if method == "snapkv" else {}))
        assert all(isinstance(l, CompressedKVLayer) for l in cache.layers)


def test_llava_language_model():
    model = tm.build("llava")
    patch_model(model, "snapkv", budget=6, window=2, towers="language_model")
    cfg = model.config
    n_image = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    ids = torch.cat([torch.full((2, n_image), cfg.image_token_id), torch.randint(3, tm.V - 2, (2, 5))], dim=1)
    cache = DynamicCache(config=cfg)
    model.generate(input_ids=ids, pixel_values=tm.pixels(), past_key_values=cache, max_new_tokens=3,
                   do_sample=False, pad_token_id=0)
    assert all(l.keys.shape[2] == 6 + 2 for l in cache.layers)  # budget after prefill, then 2 decode steps


def test_kv_methods_refuse_encoders_and_bad_budgets():
    from attnpatch import PatchError

    with pytest.raises(PatchError, match=r"supports \['decoder'\] models"):
        patch_model(tm.build("vit"), "h2o")
    with pytest.raises(PatchError, match="out of range"):
        patch_model(tm.build("llama"), "snapkv", compression=1.0)
    with pytest.raises(PatchError, match="needs budget > sinks"):
        patch_model(tm.build("llama"), "streaming", budget=4, sinks=4)


def test_kv_stacks_on_nothing_else_that_touches_attention():
    from attnpatch import PatchError

    model = tm.build("llama")
    patch_model(model, "h2o", budget=8)
    with pytest.raises(PatchError, match="already patched"):
        patch_model(model, "linear")


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantize_matches_naive_per_group_loop(bits):
    from attnpatch.ops.quant import dequantize, quantize

    x = torch.randn(1, 2, 16, 8, generator=torch.Generator().manual_seed(bits)) * 3
    levels = 2**bits - 1
    for axis, group in (("tokens", 4), ("channels", 4)):
        got = dequantize(quantize(x, bits, group, axis))
        expected = torch.empty_like(x)
        for h in range(2):
            for i in range(0, 16 if axis == "tokens" else 8, group):
                for j in range(8 if axis == "tokens" else 16):
                    block = x[0, h, i:i + group, j] if axis == "tokens" else x[0, h, j, i:i + group]
                    lo = block.min().half().float()
                    scale = ((block.max() - block.min()) / levels).clamp_min(1e-8).half().float()
                    value = torch.round((block - lo) / scale).clamp(0, levels) * scale + lo
                    if axis == "tokens":
                        expected[0, h, i:i + group, j] = value
                    else:
                        expected[0, h, j, i:i + group] = value
        assert torch.allclose(got, expected, atol=1e-5)
        assert (got - x).abs().max() <= (x.max() - x.min()) / levels / 2 + 1e-2


def test_kv_quant_generate_bytes_and_exact_when_nothing_is_quantised():
    model = tm.build("llama")
    dense, dense_cache = _generate(model, new_tokens=12)
    full, _ = _generate(model, "kv_quant", new_tokens=12, residual=64, group=8)
    assert torch.equal(full.sequences, dense.sequences)
    out, cache = _generate(model, "kv_quant", new_tokens=12, bits=4, group=8, residual=8, sinks=4)
    layer = cache.layers[0]
    h, d = model.config.num_key_value_heads, 16
    expected_bytes = 0
    # row 0 is left-padded by 4: its padding is not stored, and its own first tokens are its sinks
    assert [(rows.tolist(), pad) for rows, pad, _ in layer.stores] == [([1], 0), ([0], 4)]
    for rows, pad, store in layer.stores:
        stored = 20 + 11 - pad  # prompt + fed generated tokens, padding excluded
        quantised = (stored - 4 - 8) // 8 * 8
        assert store.sink_keys.shape[2] == 4 and store.quant_keys.codes.shape[2] == quantised
        assert store.keys.shape[2] == stored - 4 - quantised
        full_precision = 2 * h * (4 + stored - 4 - quantised) * d * 4
        codes = 2 * h * quantised * d * 4 // 8
        key_stats = 2 * h * (quantised // 8) * d * 2  # scale + minimum, float16, per channel and group
        value_stats = 2 * h * quantised * (d // 8) * 2  # per token and channel group
        expected_bytes += full_precision + codes + key_stats + value_stats
    assert layer.nbytes == expected_bytes + 2 * 8  # + which sequence each store holds (int64)
    assert cache_nbytes(cache) < 0.7 * cache_nbytes(dense_cache)


def test_a_new_scorer_is_a_few_lines_and_gets_keys_attention_and_validity():
    """The scorer contract: a subclass says which entries matter; the base handles padding,
    budgets, sinks, recent entries and the cache. Here: keep the entries the last 2 queries
    attend to least (a deliberately odd rule, so the test sees the scorer's choice)."""
    from attnpatch import register_method
    from attnpatch.methods.kv import KVCompressionMethod

    seen = []

    @register_method
    class LeastAttended(KVCompressionMethod):
        name, summary = "_test_least_attended", "keeps what the last two queries ignore"

        def observed_queries(self):
            return 2

        def score(self, keys, attention, valid):
            seen.append((keys.shape, attention, valid.clone()))
            return -attention

    model = tm.build("llama")
    ids, mask = tm.text_batch(length=12, left_pad=PAD)
    cache = DynamicCache(config=model.config)
    patch_model(model, "_test_least_attended", budget=4)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=True, **cache_kwargs(model, cache))
    layer = cache.layers[0]
    assert isinstance(layer, CompressedKVLayer) and layer.stored_tokens == 4
    keys_shape, attention, valid = seen[0]
    assert keys_shape == (2, 2, 12, 16) and attention.shape == valid.shape == (2, 2, 12)
    assert not valid[0, :, :PAD].any() and valid[0, :, PAD:].all()  # the base told it where padding is
    assert torch.allclose(attention[1].sum(-1), torch.full((2,), 2.0 * 2))  # 2 queries x 2 query heads per kv head
    for b in range(2):  # kept: the least attended real entries of each (sequence, kv head)
        for h in range(2):
            real = valid[b, h].nonzero().squeeze(-1)
            want = sorted(real[attention[b, h, real].argsort()[:4]].tolist())
            assert sorted(layer.positions[b, h][layer.valid[b, h]].tolist()) == want
    unpatch_model(model)


def test_snapkv_pools_the_prefix_only_and_tova_averages_heads():
    """SnapKV's pooling must not smear the observation window's (high) self-attention onto the prefix
    entries next to it; TOVA keeps one set of tokens per layer (scores averaged over heads)."""
    snap = get_method("snapkv")(Site(), **resolve_params("snapkv", {"window": 3, "kernel": 3}))
    attention = torch.tensor([1.0, 1, 1, 1, 1, 1, 0, 100, 100, 100]).expand(1, 2, 10)
    valid = torch.ones(1, 2, 10, dtype=torch.bool)
    scores = snap.score(None, attention, valid)[0, 0]
    # entry 6 pools 5 and itself only (not window entry 7, which would lift it to ~34)
    assert torch.allclose(scores[:7], torch.tensor([1.0, 1, 1, 1, 1, 2 / 3, 0.5]))
    tova = get_method("tova")(Site(), **resolve_params("tova", {}))
    per_head = torch.tensor([[[0.9, 0.1, 0.0]], [[0.0, 0.2, 0.8]]]).transpose(0, 1)  # (1, 2 heads, 3)
    assert torch.equal(tova.score(None, per_head, torch.ones(1, 2, 3, dtype=torch.bool)),
                       torch.tensor([[[0.45, 0.15, 0.4]] * 2]).reshape(1, 2, 3))


def test_forced_entries_over_budget_keep_sinks_then_the_newest():
    """Sinks and a recent window that together exceed the budget: the newest entries stay, the oldest
    recent ones go (before: the oldest forced entries were kept and the newest dropped)."""
    from attnpatch.ops.kv_select import compact, select_mask

    valid = torch.ones(1, 1, 10, dtype=torch.bool)
    index, kept = compact(select_mask(torch.zeros(1, 1, 10), valid, torch.tensor([5]), sinks=2, recent=6))
    assert index[0, 0][kept[0, 0]].tolist() == [0, 1, 7, 8, 9]


@pytest.mark.parametrize("method", METHODS)
def test_compression_zero_is_exactly_dense(method):
    model = tm.build("llama")
    dense, dense_cache = _generate(model, new_tokens=6)
    out, cache = _generate(model, method, new_tokens=6, compression=0.0)
    assert torch.equal(out.sequences, dense.sequences)
    # attention is SDPA with an explicit mask instead of the model's own call: float rounding only
    assert max((a - b).abs().max().item() for a, b in zip(out.scores, dense.scores)) <= 1e-6
    assert cache_nbytes(cache) == cache_nbytes(dense_cache)  # the model's own cache: nothing replaced
    assert all(type(a) is type(b) for a, b in zip(cache.layers, dense_cache.layers))


@pytest.mark.parametrize("method", ["knorm", "tova", "h2o", "streaming"])
def test_hold_never_evicts_the_tokens_of_the_current_step(method):
    """With decode="hold" the cache stays at the budget, yet every token written in a step is still
    there after it (knorm used to evict each new key at once: new keys have the largest norms)."""
    model = tm.build("llama")
    ids, mask = tm.text_batch(length=16)
    cache = DynamicCache(config=model.config)
    patch_model(model, method, budget=6, decode="hold", **({"sinks": 2} if method == "streaming" else {}))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=True, **cache_kwargs(model, cache))
        for step in range(4):
            mask = torch.cat([mask, mask.new_ones(2, 1)], dim=1)
            model(input_ids=ids[:, step:step + 1], attention_mask=mask, use_cache=True, **cache_kwargs(model, cache))
            for layer in cache.layers:
                assert int(layer.valid[:, 0].sum(-1).max()) == 6  # held at the budget
                newest = layer.seen_tokens - 1
                assert bool((layer.positions[layer.valid] == newest).view(2, 2, -1).any(-1).all()), method
    unpatch_model(model)


def test_grow_keeps_every_decoded_token():
    model = tm.build("llama")
    _, cache = _generate(model, "knorm", new_tokens=6, budget=5)
    layer = cache.layers[0]
    assert int(layer.valid[1, 0].sum()) == 5 + 5  # the compressed prompt + every fed generated token


def test_kv_quant_leaves_sliding_layers_as_they_are_while_decoding():
    """Gemma2 alternates sliding-window and global layers: kv_quant quantises the global ones and
    leaves the (already bounded) sliding ones to the model, step after step."""
    model = tm.build("gemma2")
    patch_model(model, "kv_quant", group=8, residual=2, sinks=1)
    ids, mask = tm.text_batch(length=12)
    cache = DynamicCache(config=model.config)
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                   pad_token_id=0, **cache_kwargs(model, cache))
    kinds = [type(layer).__name__ for layer in cache.layers]
    assert kinds == ["DynamicSlidingWindowLayer", "QuantizedKVLayer", "DynamicSlidingWindowLayer"], kinds
    assert cache.layers[1].stores[0][2].quant_keys is not None
    unpatch_model(model)


def test_head_adaptive_budgets_match_a_slow_reference():
    """AdaKV: per sequence, each kv head first keeps its floor(share x budget) best entries, then the
    rest of budget x heads goes to the best remaining entries of any head."""
    budget, share = 6, 0.34
    cache, q, k = prefill_once("h2o", budget=budget, recent_ratio=0.0, head_adaptive=share)
    differ = []
    for b in range(B):
        scores = group_sum(full_attention(q, k, b).sum(1))  # (HKV, L): H2O's score per kv head
        real = range(PAD if b == 0 else 0, L)
        protected = {(h, p) for h in range(HKV)
                     for p in sorted(real, key=lambda p: -float(scores[h, p]))[: int(budget * share)]}
        rest = sorted(((h, p) for h in range(HKV) for p in real if (h, p) not in protected),
                      key=lambda hp: -float(scores[hp]))
        chosen = protected | set(rest[: budget * HKV - len(protected)])
        for head in range(HKV):
            assert kept_positions(cache, b, head) == sorted(p for h, p in chosen if h == head), (b, head)
        differ.append(len({len(kept_positions(cache, b, h)) for h in range(HKV)}) > 1)
    assert any(differ)  # the heads' budgets differ


def test_a_decoding_step_evicts_what_the_full_selection_evicts():
    """evict_lowest (O(L), no sort) against select_mask on out-of-order caches one step over budget."""
    from attnpatch.ops.kv_select import evict_lowest, select_mask

    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        length, keep, sinks = 30, torch.tensor([12, 9]), trial % 3
        positions = torch.stack([torch.randperm(length, generator=g) for _ in range(4)]).reshape(2, 2, length).int()
        valid = torch.ones(2, 2, length, dtype=torch.bool)
        valid[1] &= positions[1] >= length - 10  # row 1: its 10 newest positions only (left padding)
        valid[0] &= positions[0] >= 17  # row 0: 13 entries, one over its budget of 12
        scores = torch.rand(2, 2, length, generator=g)
        recent = torch.tensor([3, 2])
        expected = select_mask(scores, valid, keep, sinks, recent, positions=positions)
        kept, freed = evict_lowest(scores, valid, positions, keep, sinks, recent, length - 1)
        assert torch.equal(kept, expected), trial
        assert kept[0].sum(-1).tolist() == [12, 12] and kept[1].sum(-1).tolist() == [9, 9]
        # every row is one over: the freed slots come back, and they are exactly the evicted entries
        assert freed.shape == (2, 2, 1)
        assert torch.equal(torch.zeros_like(valid).scatter_(-1, freed, True), valid & ~kept)


@pytest.mark.parametrize("method", ["tova", "h2o", "streaming"])
def test_reusing_freed_slots_is_invisible(method, monkeypatch):
    """A held cache writes each new token into the slot its last eviction freed (no copy of the cache);
    generating must give what packing the kept entries in order after every step gives."""
    from attnpatch.ops.kv_select import compact

    model = tm.build("llama")
    params = {"budget": 7, **({"sinks": 2} if method == "streaming" else {})}
    reused, _ = _generate(model, method, new_tokens=8, **params)

    def pack_in_order(layer, kept, freed=None):
        layer.keep(*compact(kept))
        layer.headroom = False

    monkeypatch.setattr(CompressedKVLayer, "evict", pack_in_order)
    packed, _ = _generate(model, method, new_tokens=8, **params)
    assert torch.equal(reused.sequences, packed.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(reused.scores, packed.scores)) <= 1e-5


@pytest.mark.parametrize("method", ["tova", "h2o", "streaming"])
def test_evict_every_k_steps_holds_at_most_budget_plus_k_minus_1(method):
    model = tm.build("llama")
    ids, mask = tm.text_batch(length=16)
    cache = DynamicCache(config=model.config)
    patch_model(model, method, budget=6, evict_every=3, **({"sinks": 2} if method == "streaming" else {}))
    held = []
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=True, **cache_kwargs(model, cache))
        for step in range(7):
            mask = torch.cat([mask, mask.new_ones(2, 1)], dim=1)
            model(input_ids=ids[:, step:step + 1], attention_mask=mask, use_cache=True, **cache_kwargs(model, cache))
            held.append({int(layer.valid[:, 0].sum(-1).max()) for layer in cache.layers})
    assert held == [{7}, {8}, {6}, {7}, {8}, {6}, {7}]  # back to the budget on every third step
    assert all(layer.stored_tokens == 6 + 3 for layer in cache.layers)  # slots: the budget + 3 steps
    unpatch_model(model)


def _streaming_decode(ids, mask, budget, sinks, ring=True, steps=9, padded_step=None, double_step=None):
    """Greedy steps of a streaming-patched tiny Llama (row 0's token of `padded_step` masked out, two
    tokens fed at `double_step`), the ring on or off; returns the steps' logits, each step's kept positions per layer, row and kv head,
    the cache, and how many slots the ring freed."""
    from attnpatch.methods.kv.streaming import StreamingLLM

    freed, free = [], CompressedKVLayer.free
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(CompressedKVLayer, "free", lambda layer, slots: (freed.append(slots), free(layer, slots)))
        if not ring:
            patch.setattr(StreamingLLM, "fixed_eviction", lambda self, layer, lq: None)
        model = tm.build("llama")
        patch_model(model, "streaming", budget=budget, sinks=sinks)
        cache, logits, kept = DynamicCache(config=model.config), [], []
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, use_cache=True, **cache_kwargs(model, cache))
            for step in range(steps):
                new = out.logits[:, -1:].argmax(-1)
                if step == double_step:
                    new = torch.cat([new, new.flip(0)], dim=1)
                mask = torch.cat([mask, mask.new_tensor([[int(step != padded_step)], [1]]).expand(2, new.shape[1])], dim=1)
                out = model(input_ids=new, attention_mask=mask, use_cache=True, **cache_kwargs(model, cache))
                logits.append(out.logits)
                kept.append([sorted(layer.positions[b, h][layer.valid[b, h]].tolist())
                             for layer in cache.layers for b in range(2) for h in range(2)])
    return logits, kept, cache, len(freed)


@pytest.mark.parametrize("prompt,budget,sinks,left_pad", [(20, 7, 2, 0), (5, 7, 2, 0), (20, 6, 0, 0), (20, 7, 2, 3)])
def test_streaming_decodes_through_a_ring_over_its_window(prompt, budget, sinks, left_pad):
    """StreamingLLM's held steps free the slot after the one freed last (a ring over the window's
    slots, no scores): every step keeps exactly its definition (each row's first `sinks` real tokens
    and its newest budget - sinks) and gives bitwise what the scored eviction gives."""
    ids, mask = tm.text_batch(length=prompt, left_pad=left_pad)
    logits, kept, cache, freed = _streaming_decode(ids, mask, budget, sinks)
    over_budget_steps = 9 - max(0, budget - prompt)  # a short prompt first grows to the budget
    assert freed == len(cache.layers) * over_budget_steps  # every held step freed its slot by the ring
    for step, rows in enumerate(kept):
        for index, row in enumerate(rows):
            seen = list(range(left_pad if (index // 2) % 2 == 0 else 0, prompt + step + 1))
            assert row == (seen if len(seen) <= budget else seen[:sinks] + seen[len(seen) - (budget - sinks):]), step
    scored_logits, scored_kept, _, scored_freed = _streaming_decode(ids, mask, budget, sinks, ring=False)
    assert scored_freed == 0 and scored_kept == kept
    assert all(torch.equal(a, b) for a, b in zip(logits, scored_logits))


@pytest.mark.parametrize("step", ["padded_step", "double_step"])
def test_streaming_leaves_its_ring_at_a_padded_or_multi_token_step(step):
    ids, mask = tm.text_batch(length=20)
    logits, kept, cache, freed = _streaming_decode(ids, mask, 7, 2, **{step: 3})
    assert freed == len(cache.layers) * 3  # the three steps before it; the scored path afterwards
    assert all(layer.policy.ring is False for layer in cache.layers)
    scored_logits, scored_kept, _, _ = _streaming_decode(ids, mask, 7, 2, ring=False, **{step: 3})
    assert scored_kept == kept and all(torch.equal(a, b) for a, b in zip(logits, scored_logits))


def test_streaming_starts_its_ring_only_on_the_sinks_then_the_window_in_order():
    from attnpatch.methods.kv.eviction import eviction_state
    from attnpatch.methods.kv.streaming import StreamingLLM

    layer = CompressedKVLayer()
    layer.update(torch.zeros(2, 2, 8, 4), torch.zeros(2, 2, 8, 4))  # 8 entries, positions 0-7
    state = eviction_state(layer)
    state.budget = torch.tensor([7, 7])
    assert StreamingLLM._start_ring(layer, 2) == (2, 6)  # sinks 0, 1; the window 2-7 from slot 2
    layer.positions[1, 0, 2:4] = torch.tensor([3, 2], dtype=torch.int32)  # one row's window out of order
    assert StreamingLLM._start_ring(layer, 2) is False
    layer.positions[1, 0, 2:4] = torch.tensor([2, 3], dtype=torch.int32)
    state.budget = torch.tensor([7, 6])  # budgets that differ between sequences
    assert StreamingLLM._start_ring(layer, 2) is False
    state.budget = torch.tensor([8, 8])  # not over budget yet
    assert StreamingLLM._start_ring(layer, 2) is None
