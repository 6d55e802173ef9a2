"""compress_context: a context compressed once (query-agnostic), then questions on copies of it that
never evict context; batches with left padding answer as each row would alone."""

import pytest
import torch

import tiny_models as tm
from attnpatch import PatchError, cache_kwargs, cache_nbytes, compress_context, is_patched, patch_model, unpatch_model
from attnpatch.runtime.layers import CompressedKVLayer

CASES = [("snapkv", {"budget": 8, "window": 2}), ("tova", {"budget": 8}), ("streaming", {"budget": 8, "sinks": 2}),
         ("h2o", {"budget": 8}), ("knorm", {"budget": 8}), ("keydiff", {"budget": 8}), ("kvzip", {"budget": 8}),
         ("snapkv", {"budget": 8, "window": 2, "head_adaptive": 0.2}),
         ("kv_quant", {"group": 8, "residual": 2, "sinks": 1})]
IDS = [f"{m}-adaptive" if "head_adaptive" in p else m for m, p in CASES]


def _context_entries(cache):
    """Per compressed layer, per (row, head): the set of positions held as valid entries."""
    held = []
    for layer in cache.layers:
        if isinstance(layer, CompressedKVLayer):
            valid, positions = layer.valid, layer.positions
            held.append([[set(positions[b, h][valid[b, h]].tolist()) for h in range(valid.shape[1])]
                         for b in range(valid.shape[0])])
    return held


@pytest.mark.parametrize("method,params", CASES, ids=IDS)
def test_questions_never_evict_the_context_and_padded_rows_answer_as_alone(method, params):
    model = tm.build("llama")
    ids, mask = tm.text_batch(length=24, left_pad=5)
    question = tm.text_batch(batch=2, length=4, seed=7)[0]
    ctx = compress_context(model, ids, method, attention_mask=mask, **params)
    assert is_patched(model) and ctx.patched_here
    template_bytes, before = ctx.nbytes, _context_entries(ctx.template)
    assert template_bytes < cache_nbytes_dense(model, 24)  # compressed before any question is seen
    if "head_adaptive" in params:  # the budget is the row's over its kv heads, shared out by score
        heads = model.config.num_key_value_heads
        assert all(sum(map(len, row)) <= 8 * heads and min(map(len, row)) >= 1 for layer in before for row in layer)
        assert any(len({len(h) for h in row}) > 1 for layer in before for row in layer)  # heads differ
    elif method != "kv_quant":
        assert all(len(head) <= 8 for layer in before for row in layer for head in row)

    answers = ctx.generate(question, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    again = ctx.generate(question, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert torch.equal(answers, again)  # each question runs on its own copy: the template is untouched
    assert ctx.nbytes == template_bytes and _context_entries(ctx.template) == before

    # a conversation by hand: every context entry is still held after the question and the answer
    cache = ctx.cache()
    model.generate(ctx.input_ids_with(question), attention_mask=ctx.attention_mask_with(question), max_new_tokens=5,
                   min_new_tokens=5, do_sample=False, pad_token_id=0, **cache_kwargs(model, cache))
    after = _context_entries(cache)
    for layer_before, layer_after in zip(before, after):
        for row_before, row_after in zip(layer_before, layer_after):
            for head_before, head_after in zip(row_before, row_after):
                assert head_before <= head_after
                assert len(head_after) == len(head_before) + 4 + 4  # question + answer tokens, all kept
    assert cache_nbytes(cache) > template_bytes

    # the left-padded row answers what it answers with its context alone
    alone = compress_context(model, ids[:1, 5:], method, **params)  # the model is patched: reused as it is
    assert not alone.patched_here
    assert torch.equal(alone.generate(question[:1], max_new_tokens=5, min_new_tokens=5, do_sample=False), answers[:1])
    ctx.close()
    assert not is_patched(model)


def test_compress_context_errors_name_the_fix_and_leave_the_model_as_it_was():
    model = tm.build("llama")
    ids, _ = tm.text_batch(length=12)
    with pytest.raises(PatchError, match="keeps its own KV cache"):
        compress_context(model, ids, "block_topk")
    assert not is_patched(model)
    patch_model(model, "tova", budget=4)
    with pytest.raises(PatchError, match="unpatch_model"):
        compress_context(model, ids, "snapkv", budget=4)
    with pytest.raises(PatchError, match="not with"):
        compress_context(model, ids, "tova", budget=6)
    ctx = compress_context(model, ids, "tova")  # no parameters: the existing patch is used
    with pytest.raises(PatchError, match="one question per context row"):
        ctx.generate(torch.ones(3, 2, dtype=torch.long), max_new_tokens=1)
    ctx.close()
    assert is_patched(model)  # the caller's own patch stays
    unpatch_model(model)


def replay_scores_by_definition(model, ids):
    """(layers, Hkv, L): the largest attention any replay query of a kv head's group gives each context
    entry, from one dense eager forward over context + context (the replay with no instruction)."""
    length = ids.shape[1]
    model.set_attn_implementation("eager")
    with torch.no_grad():
        weights = model(input_ids=torch.cat([ids, ids], 1), output_attentions=True).attentions
    model.set_attn_implementation("sdpa")
    groups = model.config.num_attention_heads // model.config.num_key_value_heads
    return torch.stack([w[0, :, length:, :length].reshape(-1, groups, length, length).amax(dim=(1, 2))
                        for w in weights])


def test_kvzip_keeps_what_replaying_the_context_attends_most():
    """Against the definition: one dense forward over context + replay (eager attention weights);
    per layer and kv head, the sinks plus the entries with the largest attention any replay query
    of the head's group gives them."""
    model = tm.build("llama")
    ids, _ = tm.text_batch(batch=1, length=20)
    budget, sinks = 8, 2
    scores = replay_scores_by_definition(model, ids)
    ctx = compress_context(model, ids, "kvzip", budget=budget, sinks=sinks)
    layers = [layer for layer in ctx.template.layers if isinstance(layer, CompressedKVLayer)]
    assert len(layers) == model.config.num_hidden_layers
    for layer, per_kv in zip(layers, scores):
        for head in range(per_kv.shape[0]):
            best = [p for p in per_kv[head].argsort(descending=True).tolist() if p >= sinks][: budget - sinks]
            kept = sorted(layer.positions[0, head][layer.valid[0, head]].tolist())
            assert kept == sorted(list(range(sinks)) + best), head
    answer = ctx.generate(ids[:, :3], max_new_tokens=3, do_sample=False)
    # by hand on a copy of the compressed cache: the question, then greedy steps (positions continue)
    cache, tokens, step = ctx.cache(), [], ids[:, :3]
    with torch.no_grad():
        for _ in range(3):
            logits = model(input_ids=step, use_cache=True, **cache_kwargs(model, cache)).logits
            step = logits[:, -1:].argmax(-1)
            tokens.append(step)
    assert torch.equal(answer, torch.cat(tokens, dim=1))
    ctx.close()


def test_kvzip_one_budget_for_the_whole_model():
    """scope='model': the entries of every layer and kv head compete for budget x heads x layers;
    sinks stay in every head, the rest goes to the largest replay attention wherever it is."""
    model = tm.build("llama")
    ids, _ = tm.text_batch(batch=1, length=20)
    budget, sinks = 8, 2
    scores = replay_scores_by_definition(model, ids)
    ranked = sorted(((float(scores[i, h, p]), i, h, p) for i, h, p in torch.cartesian_prod(
        *(torch.arange(n) for n in scores.shape)).tolist() if p >= sinks), reverse=True)
    heads = scores.shape[0] * scores.shape[1]
    chosen = {(i, h, p) for _, i, h, p in ranked[: (budget - sinks) * heads]}
    with compress_context(model, ids, "kvzip", budget=budget, sinks=sinks, scope="model") as ctx:
        layers = [layer for layer in ctx.template.layers if isinstance(layer, CompressedKVLayer)]
        counts = []
        for i, layer in enumerate(layers):
            for h in range(scores.shape[1]):
                kept = sorted(layer.positions[0, h][layer.valid[0, h]].tolist())
                assert kept == sorted(list(range(sinks)) + [p for j, g, p in chosen if (j, g) == (i, h)]), (i, h)
                counts.append(len(kept))
        assert sum(counts) == budget * heads and len(set(counts)) > 1  # the same total, spread unevenly


def test_kvzip_outside_compress_context_raises():
    model = tm.build("llama")
    patch_model(model, "kvzip", budget=4)
    ids, _ = tm.text_batch(length=12)
    with pytest.raises(PatchError, match="compress_context"):
        model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
    unpatch_model(model)


def test_evaluations_compress_a_replaying_method_through_compress_context():
    """kvzip cannot prefill with one forward: decoding perplexity, decode speed and retrieval prefill
    it through compress_context, and give what compressing by hand then stepping gives."""
    from attnpatch.analysis.retrieval_prompts import passkey_case
    from attnpatch.evaluation import decoding_perplexity
    from attnpatch.evaluation.retrieval import evaluate_retrieval
    from attnpatch.evaluation.speed import decode_speed

    model, tokenizer = tm.build("llama"), tm.tiny_tokenizer()
    ids = tm.text_batch(length=20)[0][:1]
    patch_model(model, "kvzip", budget=6)
    result = decoding_perplexity(model, ids[0], prefill=12, progress=False)
    with compress_context(model, ids[:, :12], "kvzip") as ctx:  # by hand
        cache, nll = ctx.cache(), [torch.nn.functional.cross_entropy(ctx.next_token_logits[0], ids[0, 12:13])]
        for t in range(12, 19):
            logits = model(input_ids=ids[:, t:t + 1], **cache_kwargs(model, cache), use_cache=True).logits
            nll.append(torch.nn.functional.cross_entropy(logits[0], ids[0, t + 1:t + 2]))
    assert is_patched(model)  # the evaluation's own patch stays
    assert result.tokens == 8 and abs(result.nll - float(torch.stack(nll).mean())) < 1e-5
    assert result.extra["cache_bytes"] == cache_nbytes(cache)
    assert decode_speed(model, prompt_tokens=16, new_tokens=2)["kv_bytes"] < cache_nbytes_dense(model, 18)

    import random

    cases = [passkey_case(tokenizer, 48, depth, random.Random(0)) for depth in (0.0, 1.0)]
    rows = evaluate_retrieval(model, tokenizer, cases, max_new_tokens=3, progress=False).cases
    assert all(r["query_agnostic"] for r in rows)
    with compress_context(model, tokenizer(cases[1].context, return_tensors="pt").input_ids, "kvzip",
                          tokenizer=tokenizer) as ctx:
        question = tokenizer(cases[1].question, add_special_tokens=False, return_tensors="pt").input_ids
        by_hand = ctx.generate(question, max_new_tokens=3, do_sample=False, pad_token_id=0)[0]
    assert rows[1]["answer"] == tokenizer.decode(by_hand, skip_special_tokens=True).strip()
    unpatch_model(model)
    with pytest.raises(ValueError, match="query_agnostic"):  # nothing to compress the context with
        evaluate_retrieval(model, tokenizer, cases, progress=False, query_agnostic=True)
    patch_model(model, "snapkv", budget=6, window=2)  # any KV method, when asked
    assert all(r["query_agnostic"] for r in evaluate_retrieval(model, tokenizer, cases, max_new_tokens=3,
                                                               progress=False, query_agnostic=True).cases)
    assert not any(r["query_agnostic"] for r in evaluate_retrieval(model, tokenizer, cases, max_new_tokens=3,
                                                                   progress=False).cases)
    unpatch_model(model)


@pytest.mark.parametrize("name", ["mistral", "gemma2", "qwen3"])
def test_compress_context_on_other_decoders(name):
    """Sliding-window layers (Mistral, Gemma2) keep applying the model's window on the compressed
    context; the padded row still answers as it does alone."""
    model = tm.build(name)
    ids, mask = tm.text_batch(length=24, left_pad=5)
    question = tm.text_batch(batch=2, length=4, seed=7)[0]
    with compress_context(model, ids, "snapkv", attention_mask=mask, budget=8, window=2) as ctx:
        assert ctx.nbytes < cache_nbytes_dense(model, 24)
        answers = ctx.generate(question, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    with compress_context(model, ids[:1, 5:], "snapkv", budget=8, window=2) as alone:
        assert torch.equal(alone.generate(question[:1], max_new_tokens=4, min_new_tokens=4, do_sample=False),
                           answers[:1])


def cache_nbytes_dense(model, length: int) -> int:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * length * head_dim * 4
