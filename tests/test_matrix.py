"""Every method in every dtype, and every decoder method on a left-padded batch.

1. dtype: each method runs in float32, bfloat16 and float16 on each tiny model kind it
   supports (decoder: Llama; encoder: ViT; VLM methods: Llava; diffusion: DiT). Decoders are measured on a prefill
   of a left-padded batch plus 4 cached decoding steps, so cache-keeping methods run their cache.
   Tolerance (stated): no NaN or inf, and the half-precision output's largest difference from the same
   method's float32 output, relative to the float32 output's largest magnitude, is at most 3x what the
   unpatched model shows in that dtype (measured alongside: ~0.006-0.009 bfloat16, ~0.001 float16);
   knorm, var and kv_quant, whose discrete choices flip under rounding, get 0.25, 0.06 and 0.03.
2. batch: each decoder-capable method runs `generate()` (greedy, 5 new tokens) on a batch of 2 whose
   first row is left-padded by 3, and each row agrees with generating that row alone: the same
   tokens and every step's logits within 1e-4 (for `softmax` within 1e-6: the unpatched model's own
   batch-vs-alone difference is ~1e-7 in float32, so bitwise equality is not what dense attention gives).

Both also assert the method was active: its attention was called (call count), its cache layers
are in the cache and hold fewer bytes than the dense cache, the structure or the token count changed.
"""

from __future__ import annotations

import functools

import pytest
import tiny_models as tm
import torch
from transformers import DynamicCache

from attnpatch import cache_nbytes, compress_context, list_methods, patch_model, patched_methods, unpatch_model
from attnpatch.runtime.cache import cache_kwargs

KV = {"streaming": {"compression": 0.5, "sinks": 2}, "h2o": {"compression": 0.5},
      "tova": {"compression": 0.5}, "knorm": {"compression": 0.5}, "keydiff": {"compression": 0.5},
      "kvzip": {"compression": 0.5, "chunk": 8},
      "snapkv": {"compression": 0.5, "window": 4, "kernel": 3},
      "pyramidkv": {"compression": 0.5, "window": 4, "kernel": 3}}
# method -> (tiny models it runs on here, parameters that make it act at these lengths)
CASES = {
    "softmax": (["llama", "vit"], {}),
    "sliding_window": (["llama", "vit"], {"window": 5, "sinks": 1, "block_size": 4}),
    "a_shape": (["llama", "vit"], {"block_size": 4, "local_blocks": 1}),
    "bigbird": (["llama", "vit"], {"block_size": 4, "window_blocks": 0, "random_blocks": 1}),
    "block_topk": (["llama", "vit"], {"block_size": 4, "top_k": 1}),
    "seer_gate": (["llama", "vit"], {"block_size": 4, "top_k": 1}),
    "star": (["llama", "vit"], {"block_size": 4, "context_blocks": 1, "anchor_blocks": 0, "query_tokens": 1}),
    "vertical_slash": (["llama"], {"block_size": 4, "vertical": 2, "slash": 2, "last_q": 4}),
    "window_2d": (["vit"], {"tile": 2, "window_tiles": 1}),
    "agent": (["vit"], {"agent_grid": 2}),
    "linear": (["llama", "vit"], {"feature_map": "elu", "chunk_size": 4}),
    "lolcats": (["llama", "vit"], {"window": 4, "chunk_size": 4, "gate_init": 0.5}),
    "gated": (["llama", "vit"], {}),
    "act": (["llama", "vit"], {"alpha": 1.0, "block_size": 4}),
    "duo_heads": (["llama"], {"sinks": 1, "window": 4}),
    **{name: (["llama"], params) for name, params in KV.items()},
    "kv_quant": (["llama"], {"group": 8, "residual": 2, "sinks": 1, "bits": 4}),
    "prune_heads": (["llama", "vit"], {}),
    "kv_merge": (["llama"], {"kv_heads": 1}),
    "mla": (["llama"], {"rank": 16}),
    "visual_token_prune": (["llava"], {"ratio": 0.5}),
    "token_merge": (["vit", "dit", "llava"], {"r": 2, "destinations": "strided"}),
    "attention_reuse": (["dit"], {}),
    "var": (["llava"], {"p": 1.0, "rho": 0.0, "tau": 1.5, "dims": [0, 1, 2, 3]}),
}
# the half-precision error may be this many times the unpatched model's own (measured in the test)
DENSE_ERROR_FACTOR = 3.0
# methods whose discrete choices flip when inputs are rounded: tiny random keys have near-equal norms
# (knorm evicts by key norm), var's massive-activation threshold sits near the tiny model's values, and
# kv_quant's 4-bit codes move by a whole step (1/15 of a group's range) when a value crosses a boundary
DISCRETE_CHOICE_TOLERANCE = {"knorm": 0.25, "var": 0.06, "kv_quant": 0.03}
PROMPT, STEPS, PAD = 14, 4, 3


def patch(model, name: str, model_name: str):
    """Patch with the case's parameters, plus the per-layer settings some methods need."""
    params = dict(CASES[name][1])
    if name == "duo_heads":
        return patch_model(model, name, **params, layer_params={0: {"retrieval_heads": [1]}})
    if name == "prune_heads":
        return patch_model(model, name, layers=[0], layer_params={0: {"heads": [0, 1]}})
    return patch_model(model, name, **params)


def llava_inputs(model, left_pad: int = 0):
    cfg = model.config
    n_image = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    g = torch.Generator().manual_seed(5)
    text = torch.randint(3, tm.V - 2, (2, 6), generator=g)
    ids = torch.cat([text[:, :2], torch.full((2, n_image), cfg.image_token_id), text[:, 2:]], dim=1)
    mask = torch.ones_like(ids)
    if left_pad:
        ids = torch.cat([torch.zeros(2, left_pad, dtype=ids.dtype), ids], dim=1)
        mask = torch.cat([torch.zeros(2, left_pad, dtype=mask.dtype), mask], dim=1)
        ids[1, :left_pad], mask[1, :left_pad] = ids[1, left_pad:2 * left_pad], 1  # only row 0 is padded
        ids[1] = torch.cat([text[1, :2], torch.full((n_image,), cfg.image_token_id), text[1, 2:],
                            text[1, :left_pad]])
    return ids, mask, tm.pixels()


@torch.no_grad()
def decoder_outputs(model, name: str, dtype):
    """Logits of the last prompt position and of STEPS teacher-forced cached decoding steps (B, 1+STEPS, V),
    and the cache: the path where cache-keeping methods act. Inputs go to the model's device."""
    extra, device = {}, next(model.parameters()).device
    if name == "llava":
        ids, mask, pixels = llava_inputs(model, left_pad=PAD)
        extra["pixel_values"] = pixels.to(device, dtype)
    else:
        ids, mask = tm.text_batch(length=PROMPT, left_pad=PAD)
    ids, mask = ids.to(device), mask.to(device)
    replays = replays_context(model)
    if replays:  # compressed through compress_context (its positions count real tokens only)
        cache, logits = compress_context(model, ids, replays, attention_mask=mask).template, []
    else:
        cache = DynamicCache(config=model.config)
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, **cache_kwargs(model, cache), **extra)
        logits = [out.logits[:, -1:]]
    follow = torch.randint(3, tm.V - 2, (2, STEPS), generator=torch.Generator().manual_seed(7)).to(device)
    for t in range(STEPS):
        mask = torch.cat([mask, mask.new_ones(2, 1)], dim=1)
        step = {"position_ids": mask.sum(-1, keepdim=True) - 1} if replays else {}
        out = model(input_ids=follow[:, t:t + 1], attention_mask=mask, use_cache=True, **cache_kwargs(model, cache),
                    **step)
        logits.append(out.logits)
    return torch.cat(logits, dim=1).float(), cache


@torch.no_grad()
def encoder_outputs(model, dtype):
    pixels = tm.pixels()
    if any(m.name == "token_merge" for m in patched_methods(model)):
        # neighbouring patch columns repeat, as flat regions of real images do: the tokens worth merging are
        # clear, so rounding does not flip which ones merge (random patches are all about equally alike)
        pixels[..., 8:16], pixels[..., 24:32] = pixels[..., 0:8], pixels[..., 16:24]
    return model(pixel_values=pixels.to(next(model.parameters()).device, dtype)).last_hidden_state.float(), None


@torch.no_grad()
def diffusion_outputs(model, dtype):
    device = next(model.parameters()).device
    sample = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4)).to(device, dtype)
    return model(sample, timestep=torch.tensor([3, 7], device=device),
                 class_labels=torch.tensor([1, 2], device=device)).sample.float(), None


def outputs(model, model_name: str, dtype):
    if model_name == "dit":
        return diffusion_outputs(model, dtype)
    if model_name == "vit":
        return encoder_outputs(model, dtype)
    return decoder_outputs(model, model_name, dtype)


def replays_context(model) -> str | None:
    """The method's name when it scores a context by replaying it (kvzip): it runs through compress_context."""
    methods = patched_methods(model)
    return methods[0].name if methods and getattr(methods[0], "replays_context", False) else None


def relative_error(got, reference) -> float:
    return float((got - reference).abs().max() / reference.abs().max())


@functools.cache
def dense_dtype_error(model_name: str, dtype) -> float:
    """The unpatched tiny model's own relative error in `dtype` against float32 (~0.006-0.009 in
    bfloat16, ~0.001 in float16)."""
    model = tm.build(model_name)
    reference, _ = outputs(model, model_name, torch.float32)
    return relative_error(outputs(model.to(dtype), model_name, dtype)[0], reference)


@functools.cache
def dense_cache_bytes(model_name: str) -> int:
    model = tm.build(model_name)
    return cache_nbytes(decoder_outputs(model, model_name, torch.float32)[1])


def assert_active(name: str, model, model_name: str, cache, before_params: int):
    """The method really ran: attention calls, its cache layers and their bytes, fewer heads or tokens."""
    methods = patched_methods(model)
    assert methods, f"{name} placed nothing"
    if name == "prune_heads":
        assert sum(p.numel() for p in model.parameters()) < before_params
        return
    if name == "kv_merge":  # structural: fewer kv heads in the projections and in the cache itself
        assert sum(p.numel() for p in model.parameters()) < before_params
        assert all(layer.keys.shape[1] == 1 for layer in cache.layers)
        float32_bytes = cache_nbytes(cache) * 4 // cache.layers[0].keys.element_size()
        assert float32_bytes * 2 == dense_cache_bytes(model_name)  # 2 kv heads -> 1
        return
    assert all(m.calls > 0 for m in methods), f"{name}: some patched modules were never called"
    if name in ("visual_token_prune", "token_merge") and model_name == "llava":  # fewer tokens reached the LM
        ids = llava_inputs(model, left_pad=PAD)[0]
        assert cache.get_seq_length() < ids.shape[1] + STEPS
    if name == "token_merge":  # every layer merged its r tokens
        assert methods[0].state.merges >= len(methods)
    if name == "var":  # visual sinks were found and redistributed in some layer
        assert any(m.sinks is not None and bool(m.sinks.any()) for m in methods)
    if name in KV or name in ("kv_quant", "duo_heads", "mla"):
        layers = [cache.layers[m.site.layer] for m in methods]
        expected = {"kv_quant": "QuantizedKVLayer", "duo_heads": "DuoHeadLayer", "mla": "LatentKVLayer"}.get(name, "CompressedKVLayer")
        assert all(type(layer).__name__ == expected for layer in layers), (name, [type(x) for x in layers])
        assert cache_nbytes(cache) < dense_cache_bytes(model_name)


def method_model_pairs():
    return [(name, model_name) for name, (models, _) in CASES.items() for model_name in models]


def test_every_registered_method_is_in_the_matrix():
    assert sorted(CASES) == sorted(m.name for m in list_methods())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("name,model_name", method_model_pairs())
def test_half_precision_agrees_with_float32(name, model_name, dtype):
    model = tm.build(model_name)
    before_params = sum(p.numel() for p in model.parameters())
    patch(model, name, model_name)
    reference, _ = outputs(model, model_name, torch.float32)
    model.to(dtype)
    for method in patched_methods(model):
        method.calls = 0
    got, cache = outputs(model, model_name, dtype)
    assert torch.isfinite(got).all(), f"{name} on {model_name} in {dtype}: NaN or inf"
    error = relative_error(got, reference)
    tolerance = DISCRETE_CHOICE_TOLERANCE.get(name) or DENSE_ERROR_FACTOR * dense_dtype_error(model_name, dtype)
    assert error <= tolerance, f"{name} on {model_name} in {dtype}: relative error {error:.4f} > {tolerance:.4f}"
    assert_active(name, model, model_name, cache, before_params)


DECODER_CASES = [(name, model_name) for name, model_name in method_model_pairs() if model_name in ("llama", "llava")]


@torch.no_grad()
def generate(model, model_name: str, rows: slice, pad: int):
    """Greedy tokens, per-step logits and the cache of generating rows `rows` (row 0 alone: unpadded)."""
    if model_name == "llava":
        ids, mask, pixels = llava_inputs(model, left_pad=pad)
        extra = {"pixel_values": pixels[rows]}
    else:
        ids, mask = tm.text_batch(length=PROMPT, left_pad=pad)
        extra = {}
    ids, mask = ids[rows], mask[rows]
    if pad and ids.shape[0] == 1 and rows.start == 0:  # row 0 alone: without its padding
        ids, mask = ids[:, pad:], mask[:, pad:]
    cache = DynamicCache(config=model.config)
    if replays_context(model):  # the prompt but its last token compressed first, then generate after it
        cache = compress_context(model, ids[:, :-1], replays_context(model), attention_mask=mask[:, :-1]).template
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=STEPS + 1, min_new_tokens=STEPS + 1,
                         do_sample=False,
                         pad_token_id=0, output_scores=True, return_dict_in_generate=True,
                         **cache_kwargs(model, cache), **extra)
    scores = torch.stack(out.scores, dim=1).clamp_min(-1e4)  # min_new_tokens sets EOS to -inf
    return out.sequences[:, ids.shape[1]:], scores, cache


@pytest.mark.parametrize("name,model_name", DECODER_CASES)
def test_left_padded_batch_generates_what_each_row_generates_alone(name, model_name):
    model = tm.build(model_name)
    before_params = sum(p.numel() for p in model.parameters())
    patch(model, name, model_name)
    tokens, scores, cache = generate(model, model_name, slice(0, 2), PAD)
    assert_active(name, model, model_name, cache, before_params)
    alone = [generate(model, model_name, slice(row, row + 1), PAD) for row in range(2)]
    tolerance = 1e-6 if name == "softmax" else 1e-4  # softmax: as close as the unpatched model gets (~1e-7)
    for row, (alone_tokens, alone_scores, _) in enumerate(alone):
        assert torch.equal(tokens[row], alone_tokens[0]), f"{name}: row {row} generated other tokens in the batch"
        error = (scores[row] - alone_scores[0]).abs().max()
        assert error <= tolerance, f"{name}: row {row} differs from the row alone by {error:.2e}"
    unpatch_model(model)
