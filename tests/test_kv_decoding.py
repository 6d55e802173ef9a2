"""KV methods while decoding, against step-by-step references written here in float64: after a padded
prompt and each of 10 one-token steps, the positions every (sequence, kv head) holds are the ones the
method's paper keeps.

- H2O: the attention each entry received, summed over every query since it arrived (the running sum),
  evicts the lowest outside the recent window;
- TOVA: the newest query's attention, averaged over the layer's heads, re-scored at every step;
- both with evict_every > 1: held entries pile up and the eviction every k-th step cuts to the budget
  (H2O's sum still counts every step's query; TOVA scores with the evicting step's query);
- StreamingLLM: the first `sinks` real tokens and the newest (budget - sinks), whatever the scores
  (its ring over the window's slots is what runs here);
- SnapKV, Knorm, KeyDiff: the prompt compressed once, then every decoded token kept;
- sliding_window's decoding cache: the first `sinks` real tokens and the `window` newest.
"""

from __future__ import annotations

import pytest
import tiny_models as tm
import torch
from test_kv import B, D, HKV, HQ, L, PAD, Site, full_attention, group_sum, reference_keep
from transformers import DynamicCache

from attnpatch import cache_kwargs, patch_model
from attnpatch.registry import get_method, resolve_params
from attnpatch.runtime.call import AttentionCall
from attnpatch.runtime.layers import CompressedKVLayer

STEPS = 10


def random_qkv(seed: int = 3):
    """q (B, HQ, L + STEPS, D) and k, v (B, HKV, L + STEPS, D): the prompt, then one token per step."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, heads, L + STEPS, D, generator=g) for heads in (HQ, HKV, HKV))


def run_method(method: str, params: dict):
    """The method on a fresh cache layer: the left-padded prompt (row 0 padded by PAD), then STEPS
    one-token steps. Yields the positions each (sequence, kv head) holds after the prompt and each step."""
    q, k, v = random_qkv()
    instance = get_method(method)(Site(), **resolve_params(method, params))
    layer = CompressedKVLayer()
    keys, values = layer.update(k[:, :, :L], v[:, :, :L])
    mask = torch.ones(B, 1, L, L, dtype=torch.bool).tril()
    mask[0, :, :, :PAD] = False
    instance.attention(AttentionCall(None, q[:, :, :L], keys, values, mask, True, D**-0.5, cache_layer=layer))
    yield held(layer)
    for t in range(L, L + STEPS):
        keys, values = layer.update(k[:, :, t:t + 1], v[:, :, t:t + 1])
        instance.attention(AttentionCall(None, q[:, :, t:t + 1], keys, values, None, True, D**-0.5, cache_layer=layer))
        yield held(layer)


def held(layer) -> list[list[list[int]]]:
    return [[sorted(layer.positions[b, h][layer.valid[b, h]].tolist()) for h in range(HKV)] for b in range(B)]


def step_attention(q, k, b: int, t: int, positions: list[int]) -> torch.Tensor:
    """(HKV, len(positions)) float64: query t's softmax attention over `positions` in sequence b, each
    kv head's query group summed."""
    group = HQ // HKV
    out = []
    for kv_head in range(HKV):
        keys = k[b, kv_head, positions].double()
        weights = [torch.softmax(keys @ q[b, kv_head * group + g, t].double() * D**-0.5, 0) for g in range(group)]
        out.append(sum(weights))
    return torch.stack(out)


def evict_lowest(held_positions: list[int], score: dict, budget: int, sinks: int, recent: int) -> list[int]:
    """Drop the lowest-scoring entries over budget, never the `sinks` oldest or the `recent` newest."""
    held_positions = sorted(held_positions)
    forced = set(held_positions[:sinks]) | set(held_positions[len(held_positions) - recent:])
    while len(held_positions) > budget:
        victim = min((p for p in held_positions if p not in forced), key=lambda p: score[p])
        held_positions.remove(victim)
    return held_positions


def h2o_reference(budget: int, recent_ratio: float, evict_every: int = 1):
    q, k, _ = random_qkv()
    recent = int(budget * recent_ratio)
    states = []
    for b in range(B):
        weights = full_attention(q[:, :, :L], k[:, :, :L], b)  # (HQ, L, L), padding excluded
        column_sums = group_sum(weights.sum(1))  # (HKV, L): attention each entry got from every prompt query
        heads = []
        for h in range(HKV):
            kept = reference_keep(column_sums[h], b, h, budget, 0, recent)
            heads.append((kept, {p: float(column_sums[h, p]) for p in kept}))
        states.append(heads)
    yield [[kept for kept, _ in heads] for heads in states]
    for t in range(L, L + STEPS):
        for b in range(B):
            for h in range(HKV):
                kept, running = states[b][h]
                kept = kept + [t]
                attention = step_attention(q, k, b, t, kept)[h]
                running[t] = 0.0
                for p, a in zip(kept, attention.tolist()):
                    running[p] += a  # the running sum: every query since the entry arrived
                if (t - L + 1) % evict_every == 0:  # every evict_every-th step, down to the budget
                    kept = evict_lowest(kept, running, budget, 0, max(recent, 1))
                states[b][h] = (kept, running)
        yield [[kept for kept, _ in heads] for heads in states]


def tova_reference(budget: int, evict_every: int = 1):
    q, k, _ = random_qkv()
    rows = []
    for b in range(B):
        last = group_sum(full_attention(q[:, :, :L], k[:, :, :L], b)[:, -1]).mean(0)  # heads share one choice
        rows.append(reference_keep(last, b, 0, budget))
    yield [[kept] * HKV for kept in rows]
    for t in range(L, L + STEPS):
        for b in range(B):
            kept = rows[b] + [t]
            if (t - L + 1) % evict_every == 0:  # scored when it evicts: the attention of this step's query only
                score = dict(zip(kept, step_attention(q, k, b, t, kept).mean(0).tolist()))
                kept = evict_lowest(kept, score, budget, 0, 1)
            rows[b] = kept
        yield [[kept] * HKV for kept in rows]


def streaming_reference(budget: int, sinks: int):
    for t in range(L, L + STEPS + 1):
        rows = []
        for b in range(B):
            real = list(range(PAD if b == 0 else 0, t))
            rows.append(sorted(real[:sinks] + real[len(real) - (budget - sinks):]))
        yield [[kept] * HKV for kept in rows]


@pytest.mark.parametrize("method,params,reference", [
    ("h2o", {"budget": 9, "recent_ratio": 0.34}, lambda: h2o_reference(9, 0.34)),
    ("h2o", {"budget": 8, "recent_ratio": 0.0}, lambda: h2o_reference(8, 0.0)),
    ("tova", {"budget": 7}, lambda: tova_reference(7)),
    ("h2o", {"budget": 9, "recent_ratio": 0.34, "evict_every": 3}, lambda: h2o_reference(9, 0.34, evict_every=3)),
    ("tova", {"budget": 7, "evict_every": 4}, lambda: tova_reference(7, evict_every=4)),
    ("streaming", {"budget": 8, "sinks": 2}, lambda: streaming_reference(8, 2)),
], ids=["h2o", "h2o-no-recent", "tova", "h2o-every-3", "tova-every-4", "streaming"])
def test_held_cache_keeps_what_the_papers_rule_keeps_at_every_step(method, params, reference):
    for step, (got, expected) in enumerate(zip(run_method(method, params), reference(), strict=True)):
        assert got == expected, f"{method}: step {step} holds {got}, the reference {expected}"


@pytest.mark.parametrize("method,params,kept", [("snapkv", {"budget": 10, "window": 4, "kernel": 1}, 10),
                                                ("knorm", {"budget": 6}, 6), ("keydiff", {"budget": 7}, 7),
                                                # layer 0 of 4 with spread 0.5: 1.5x the mean budget of 8
                                                ("pyramidkv", {"budget": 8, "window": 2, "spread": 0.5}, 12)])
def test_compress_once_methods_keep_every_decoded_token(method, params, kept):
    steps = list(run_method(method, params))
    prompt_kept = steps[0]
    assert all(len(row_kept) == kept for row in prompt_kept for row_kept in row)
    for step, got in enumerate(steps):
        assert got == [[kept + list(range(L, L + step)) for kept in row] for row in prompt_kept], step


def test_sliding_window_decoding_cache_holds_the_sinks_and_the_window():
    """sliding_window's decoding cache, read after the prompt and each step of a padded batch: it holds
    each row's first `sinks` real tokens (the batch shares one store of positions, and each row's query
    masks what is not its own) and the newest window - 1 tokens, all the next query may see; nothing else."""
    model = tm.build("llama")
    window, sinks, pad, prompt = 6, 2, 3, 12
    patch_model(model, "sliding_window", window=window, sinks=sinks)
    ids, mask = tm.text_batch(length=prompt, left_pad=pad)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, **cache_kwargs(model, cache))
        for step in range(STEPS):
            seen = prompt + step  # tokens so far, padding included (text_batch pads inside `prompt`)
            row_sinks = set(range(pad, pad + sinks)) | set(range(sinks))  # row 0's real tokens start at `pad`
            expected = sorted(row_sinks | set(range(seen - window + 1, seen)))
            for layer in cache.layers:
                assert layer.stream_positions.tolist() == expected, (step, layer.stream_positions.tolist())
            token = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
            out = model(input_ids=token, attention_mask=mask, use_cache=True, **cache_kwargs(model, cache))
