"""visual_token_prune and var on a tiny Llava. visual_token_prune: identity at ratio 1, the kept tokens are the top [CLS]-attention
tokens of the feature layer (eager attention weights as the reference), the language model sees
exactly the kept features with shortened inputs, labels/masks shrink with them, generate works,
unpatch restores, and bad input gets clear errors."""

import pytest
import tiny_models as tm
import torch

from attnpatch import PatchError, patch_model, unpatch_model
from attnpatch.api import patched_methods
from attnpatch.methods.tokens.visual_token_prune import keep_indices
from attnpatch.ops.reference import causal_mask, repeat_kv
from attnpatch.ops.sink_recalibration import massive_tokens, visual_sink_redistribution
from method_cases import MatrixCase, MatrixRun, fewer_cached_tokens


def visual_sinks_redistributed(run: MatrixRun) -> None:
    """Some layer found visual sinks and redistributed their attention."""
    assert any(m.sinks is not None and bool(m.sinks.any()) for m in patched_methods(run.model))


MATRIX_CASES = {
    "visual_token_prune": MatrixCase(["llava"], {"ratio": 0.5}, check=fewer_cached_tokens),
    # var's massive-activation threshold sits near the tiny model's values: rounding moves which tokens pass it
    "var": MatrixCase(["llava"], {"p": 1.0, "rho": 0.0, "tau": 1.5, "dims": [0, 1, 2, 3]}, half_precision_tolerance=0.06,
                      check=visual_sinks_redistributed),
}

PATCHES = 16  # 32 px images, 8 px patches


def inputs(model, images=1, seed=3):
    g = torch.Generator().manual_seed(seed)
    image = model.config.image_token_id
    text = torch.randint(3, tm.V - 2, (2, 6), generator=g)
    parts = [text[:, :2]]
    for _ in range(images):
        parts += [torch.full((2, PATCHES), image), text[:, 2:4]]
    ids = torch.cat(parts + [text[:, 4:]], dim=1)
    pixels = torch.randn(2 * images, 3, 32, 32, generator=g)
    return ids, pixels


def reference_scores(model, pixels):
    """[CLS] attention of the feature layer (layer 0 here), mean over heads, from eager weights."""
    tower = model.model.vision_tower
    tower.config._attn_implementation = "eager"
    try:
        out = tower(pixels, output_attentions=True)
    finally:
        tower.config._attn_implementation = "sdpa"
    return out.attentions[0][:, :, 0, 1:].mean(1)


def reference_logits(model, ids, pixels, order):
    """The unpatched model on shortened placeholders with the selected features supplied."""
    with torch.no_grad():
        image = model.model.get_image_features(pixel_values=pixels, return_dict=True)
        image.pooler_output = [f[i] for f, i in zip(image.pooler_output, order)]
        keep = order.shape[1]
        placeholder = ids == model.config.image_token_id
        rank = placeholder.long().cumsum(-1) - 1
        columns = ~(placeholder & (rank % PATCHES >= keep))
        short = ids[columns].view(ids.shape[0], -1)
        return model(input_ids=short, mm_encoder_outputs={"image": image}).logits, short


def test_ratio_one_is_the_identity_and_unpatch_restores():
    model = tm.build("llava")
    ids, pixels = inputs(model)
    with torch.no_grad():
        dense = model(input_ids=ids, pixel_values=pixels).logits
    patch_model(model, "visual_token_prune", ratio=1.0)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids, pixel_values=pixels).logits, dense, atol=1e-5)
    unpatch_model(model)
    assert "generate" not in model.__dict__ and not model._forward_pre_hooks
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, pixel_values=pixels).logits, dense)


@pytest.mark.parametrize("mode,kept", [("rank", 4), ("row", 4)])
def test_kept_tokens_are_the_top_cls_attention_tokens(mode, kept):
    model = tm.build("llava")
    ids, pixels = inputs(model)
    scores = reference_scores(model, pixels)
    order = keep_indices(scores, 0.25, mode)
    assert order.shape == (2, kept) and bool((order.diff(dim=-1) > 0).all())
    if mode == "rank":
        assert torch.equal(order, scores.topk(kept, dim=-1).indices.sort(-1).values)
    else:  # one whole grid row: the row with the best mean score
        best_row = scores.view(2, 4, 4).mean(-1).argmax(-1)
        assert torch.equal(order, best_row[:, None] * 4 + torch.arange(4))
    want, short = reference_logits(model, ids, pixels, order)
    patch_model(model, "visual_token_prune", ratio=0.25, mode=mode)
    with torch.no_grad():
        got = model(input_ids=ids, pixel_values=pixels).logits
    assert got.shape[1] == ids.shape[1] - (PATCHES - kept) == short.shape[1]
    assert torch.allclose(got, want, atol=1e-5)


def test_masks_labels_and_generation_stay_consistent():
    model = tm.build("llava")
    ids, pixels = inputs(model, images=2)
    mask = torch.ones_like(ids)
    labels = ids.masked_fill(ids == model.config.image_token_id, -100)
    order = keep_indices(reference_scores(model, pixels), 0.125, "rank")  # 2 of 16 tokens per image
    want, short = reference_logits(model, ids, pixels, order)
    with torch.no_grad():  # the loss by hand: the shortened sequence's text tokens
        want_loss = model.loss_function(logits=want, labels=short.masked_fill(short == model.config.image_token_id, -100),
                                        vocab_size=model.config.text_config.vocab_size)
    patch_model(model, "visual_token_prune", ratio=0.125)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels, attention_mask=mask, labels=labels)
    assert out.logits.shape[1] == ids.shape[1] - 2 * 14 == short.shape[1]
    hidden = out.image_hidden_states  # one tensor up to transformers 5.23, a list per image from 5.24
    hidden = torch.cat(list(hidden)) if isinstance(hidden, (list, tuple)) else hidden
    assert hidden.shape[0] == 4 * 2  # 4 images x 2 tokens
    assert torch.allclose(out.logits, want, atol=1e-5)
    assert float(out.loss) == pytest.approx(float(want_loss), abs=1e-5)
    generated = model.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=3,
                               do_sample=False)
    assert generated.shape == (2, short.shape[1] + 3) and torch.equal(generated[:, :short.shape[1]], short)
    assert torch.equal(generated[:, short.shape[1]], want[:, -1].argmax(-1))


def test_errors():
    with pytest.raises(PatchError, match="Llava-style VLM"):
        patch_model(tm.build("llama"), "visual_token_prune")
    model = patch_model(tm.build("llava"), "visual_token_prune", ratio=0.5)
    ids, pixels = inputs(model, images=1)
    ids[1, 8:12] = 5  # the second sequence loses 4 placeholders
    with pytest.raises(PatchError, match="placeholder"):
        model(input_ids=ids, pixel_values=pixels)
    with pytest.raises(PatchError, match="ratio"):
        patch_model(tm.build("llava"), "visual_token_prune", ratio=0.0)


# --- var: visual attention redistribution

def var_definition(q, k, v, image, sinks, p, rho):
    """VAR on full weight matrices, head by head (causal)."""
    b, h, n, _ = q.shape
    k, v = repeat_kv(k, h // k.shape[1]), repeat_kv(v, h // v.shape[1])
    out = torch.zeros_like(q)
    for s in range(b):
        for head in range(h):
            scores = (q[s, head] @ k[s, head].T) / q.shape[-1] ** 0.5
            weights = torch.softmax(scores.masked_fill(~causal_mask(n, n, None), float("-inf")), -1)
            on_sinks, others = image[s] & sinks[s], image[s] & ~sinks[s]
            centric = weights[:, others].sum() >= rho * weights[:, image[s]].sum()
            new = weights.clone()
            if centric:
                for i in range(n):
                    moved = p * weights[i, on_sinks].sum()
                    if weights[i, others].sum() > 1e-9:
                        new[i, on_sinks] *= 1 - p
                        new[i, others] += moved * weights[i, others] / weights[i, others].sum()
            out[s, head] = new @ v[s, head]
    return out


def test_var_op_matches_the_definition():
    g = torch.Generator().manual_seed(0)
    b, hq, hkv, n, d = 2, 4, 2, 24, 16
    q, k, v = (torch.randn(b, h, n, d, generator=g) for h in (hq, hkv, hkv))
    image = torch.zeros(b, n, dtype=torch.bool)
    image[:, 3:15] = True
    sinks = torch.zeros(b, n, dtype=torch.bool)
    sinks[0, [4, 9]] = True
    sinks[1, 12] = True
    k[:, :, 4] += 2.0  # make some heads lean on the sinks
    got = visual_sink_redistribution(q, k, v, causal_mask(n, n, None), d ** -0.5, image, sinks, p=0.6, rho=0.5, block=5)
    want = var_definition(q, k, v, image, sinks, 0.6, 0.5)
    assert torch.allclose(got, want, atol=1e-5)
    plain = visual_sink_redistribution(q, k, v, causal_mask(n, n, None), d ** -0.5, image, sinks, p=0.0, rho=0.5)
    assert (got - plain).abs().max() > 1e-2


def test_massive_tokens():
    hidden = torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(0))
    hidden[0, 0, 7] = 500.0  # the first token's massive dimension
    hidden[0, 3, 7] = 300.0  # another token with it: a sink
    hidden[0, 4, 9] = 300.0  # massive in a dimension the first token does not use: not a sink
    assert massive_tokens(hidden, 20.0).tolist() == [[True, False, False, True, False, False]]
    assert massive_tokens(hidden, 20.0, dims=[9]).tolist() == [[False, False, False, False, True, False]]


def test_var_on_llava():
    model = tm.build("llava")
    ids, pixels = inputs(model)
    with torch.no_grad():
        dense = model(input_ids=ids, pixel_values=pixels).logits
        text_only = model(input_ids=ids[:, :2]).logits
    patch_model(model, "var", p=0.0, tau=1.5, dims=[0, 1, 2, 3])
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids, pixel_values=pixels).logits, dense, atol=1e-5)
    unpatch_model(model)
    patch_model(model, "var", p=1.0, rho=0.0, tau=1.5, dims=[0, 1, 2, 3])
    methods = patched_methods(model)
    assert [m.site.tower for m in methods] == ["model.language_model.layers"] * 3
    with torch.no_grad():
        moved = model(input_ids=ids, pixel_values=pixels).logits
        assert torch.allclose(model(input_ids=ids[:, :2]).logits, text_only, atol=1e-5)  # no image: no change
    assert any(bool(m.sinks.any()) for m in methods)
    assert (moved - dense).abs().max() > 1e-4
    generated = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=3, do_sample=False)
    assert torch.equal(generated[:, ids.shape[1]], moved[:, -1].argmax(-1))
    unpatch_model(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, pixel_values=pixels).logits, dense)
    with pytest.raises(PatchError, match="exceed the language model's hidden size"):
        patch_model(model, "var", dims=[999])
    with pytest.raises(PatchError, match="Llava-style VLM"):
        patch_model(tm.build("llama"), "var")
