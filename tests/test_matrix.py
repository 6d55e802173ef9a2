"""Every method in every dtype, and every decoder method on a left-padded batch.

1. dtype: each method runs in float32, bfloat16 and float16 on each tiny model kind it
   supports (decoder: Llama; encoder: ViT; VLM methods: Llava; diffusion: DiT). Decoders are measured on a prefill
   of a left-padded batch plus 4 cached decoding steps, so cache-keeping methods run their cache.
   Tolerance (stated): no NaN or inf, and the half-precision output's largest difference from the same
   method's float32 output, relative to the float32 output's largest magnitude, is at most 3x what the
   unpatched model shows in that dtype (measured alongside: ~0.006-0.009 bfloat16, ~0.001 float16);
   methods whose discrete choices flip under rounding state a larger one in their case (knorm 0.25,
   var 0.06, kv_quant 0.03). Each method's row is its `MatrixCase`, in the test file that tests it.
2. batch: each decoder-capable method runs `generate()` (greedy, 5 new tokens) on a batch of 2 whose
   first row is left-padded by 3, and each row agrees with generating that row alone: the same
   tokens and every step's logits within 1e-4 (for `softmax` within 1e-6: the unpatched model's own
   batch-vs-alone difference is ~1e-7 in float32, so bitwise equality is not what dense attention gives).

Both also assert the method was active: its attention was called (call count), its cache layers
are in the cache and hold fewer bytes than the dense cache, the structure or the token count changed.
"""

from __future__ import annotations

import functools
import importlib
from pathlib import Path

import pytest
import tiny_models as tm
import torch
from transformers import DynamicCache

from attnpatch import cache_nbytes, compress_context, list_methods, patch_model, patched_methods, unpatch_model
from attnpatch.runtime.cache import cache_kwargs
from method_cases import MatrixCase, MatrixRun

from attnpatch.ops.work_count import ComputedWork, count_computed_blocks


def collect_cases() -> dict[str, MatrixCase]:
    """Each method's row, from the `MATRIX_CASES` of the test file that tests it (tests/method_cases.py)."""
    cases = {}
    for path in sorted(Path(__file__).parent.glob("test_*.py")):
        if path.name != Path(__file__).name and "MATRIX_CASES" in path.read_text():
            for name, case in importlib.import_module(path.stem).MATRIX_CASES.items():
                assert name not in cases, f"{name} has a matrix case in two test files"
                cases[name] = case
    return cases


CASES = collect_cases()
# the half-precision error may be this many times the unpatched model's own (measured in the test)
DENSE_ERROR_FACTOR = 3.0
PROMPT, STEPS, PAD = 14, 4, 3


def patch(model, name: str, model_name: str):
    """Patch with the case's parameters, plus the per-layer settings some methods need."""
    return patch_model(model, name, **CASES[name].params, **CASES[name].patch)


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
def unpatched_outputs(model_name: str) -> torch.Tensor:
    return outputs(tm.build(model_name), model_name, torch.float32)[0]


@functools.cache
def dense_cache_bytes(model_name: str) -> int:
    model = tm.build(model_name)
    return cache_nbytes(decoder_outputs(model, model_name, torch.float32)[1])


def assert_active(name: str, model, model_name: str, cache, before_params: int, computed: ComputedWork,
                  change_from_unpatched: float | None = None):
    """The method really ran: attention calls, its cache layers and their bytes, then the case's own
    check (fewer heads or tokens, merges, sinks found)."""
    case, methods = CASES[name], patched_methods(model)
    assert methods, f"{name} placed nothing"
    if change_from_unpatched is not None:  # a lossy method that leaves the output as it was did nothing
        assert (change_from_unpatched > 1e-3) == case.lossy, f"{name}: output changed by {change_from_unpatched:.2e}"
    if not case.structural:
        assert all(m.calls > 0 for m in methods), f"{name}: some patched modules were never called"
    if case.cache_layer:
        layers = [cache.layers[m.site.layer] for m in methods]
        assert all(type(layer).__name__ == case.cache_layer for layer in layers), (name, [type(x) for x in layers])
        assert cache_nbytes(cache) < dense_cache_bytes(model_name)
    if case.check:
        mask = llava_inputs(model, left_pad=PAD)[1] if model_name == "llava" else tm.text_batch(length=PROMPT, left_pad=PAD)[1]
        prompt = llava_inputs(model, left_pad=PAD)[0].shape[1] if model_name == "llava" else PROMPT  # pad included
        case.check(MatrixRun(model, model_name, cache, before_params, lambda: dense_cache_bytes(model_name),
                             dense_cache_tokens=prompt + STEPS, prompt_lengths=mask.sum(-1).tolist(), steps=STEPS,
                             computed=computed, change_from_unpatched=change_from_unpatched))


def method_model_pairs():
    return [(name, model_name) for name, case in CASES.items() for model_name in case.models]


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
    with count_computed_blocks() as computed:
        got, cache = outputs(model, model_name, dtype)
    assert torch.isfinite(got).all(), f"{name} on {model_name} in {dtype}: NaN or inf"
    error = relative_error(got, reference)
    tolerance = CASES[name].half_precision_tolerance or DENSE_ERROR_FACTOR * dense_dtype_error(model_name, dtype)
    assert error <= tolerance, f"{name} on {model_name} in {dtype}: relative error {error:.4f} > {tolerance:.4f}"
    unpatched = unpatched_outputs(model_name)
    steps = min(reference.shape[1], unpatched.shape[1])  # kvzip's compressed context returns the steps only
    assert_active(name, model, model_name, cache, before_params, computed,
                  relative_error(reference[:, -steps:], unpatched[:, -steps:]))


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
    with count_computed_blocks() as computed:
        tokens, scores, cache = generate(model, model_name, slice(0, 2), PAD)
    assert_active(name, model, model_name, cache, before_params, computed)
    alone = [generate(model, model_name, slice(row, row + 1), PAD) for row in range(2)]
    tolerance = 1e-6 if name == "softmax" else 1e-4  # softmax: as close as the unpatched model gets (~1e-7)
    for row, (alone_tokens, alone_scores, _) in enumerate(alone):
        assert torch.equal(tokens[row], alone_tokens[0]), f"{name}: row {row} generated other tokens in the batch"
        error = (scores[row] - alone_scores[0]).abs().max()
        assert error <= tolerance, f"{name}: row {row} differs from the row alone by {error:.2e}"
    unpatch_model(model)
