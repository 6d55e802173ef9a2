"""token_merge: r=0 / ratio 0 is the dense model, merge + unmerge keeps shapes (and loses nothing
when the merged tokens are duplicates), proportional attention against its definition and against
attention over the duplicates it stands for, token counts and activity on ViT / CLIP / SigLIP /
DiT / PixArt / SD3, batch rows independent, errors."""

import pytest
import tiny_models as tm
import torch

from attnpatch import PatchError, patch_model, patched_methods, unpatch_model
from attnpatch.ops.reference import naive_attention
from attnpatch.ops.token_merge import alternate_destinations, bipartite_merge, grid_destinations
from attnpatch.runtime.call import AttentionCall
from method_cases import MatrixCase, MatrixRun, fewer_cached_tokens


def merged_in_every_layer(run: MatrixRun) -> None:
    """Every layer merged; a ViT's output holds r = 2 tokens fewer per layer (what its MLPs saw), and a
    Llava's language model caches fewer image tokens."""
    methods = patched_methods(run.model)
    assert methods[0].state.merges >= len(methods)
    if run.model_name == "vit":
        pixels = tm.pixels().to(next(run.model.parameters()))
        tokens = run.model.config.image_size ** 2 // run.model.config.patch_size ** 2 + 1
        with torch.no_grad():
            assert run.model(pixel_values=pixels).last_hidden_state.shape[1] == tokens - 2 * len(methods)
    fewer_cached_tokens(run)


MATRIX_CASES = {"token_merge": MatrixCase(["vit", "dit", "llava"], {"r": 2, "destinations": "strided"},
                                          check=merged_in_every_layer)}

ENCODERS = ("vit", "clip", "siglip")
DIFFUSION = ("dit", "pixart", "sd3")


@pytest.mark.parametrize("name", ENCODERS + DIFFUSION)
def test_nothing_merged_is_the_dense_model_and_unpatch_restores(name):
    model = tm.build(name)
    dense = tm.run(name, model)
    patch_model(model, "token_merge", **({"r": 0} if name in ENCODERS else {"ratio": 0.0}))
    assert torch.equal(tm.run(name, model), dense)
    unpatch_model(model)
    patch_model(model, "token_merge", **({"r": 3} if name in ENCODERS else {}))
    changed = tm.run(name, model)
    methods = patched_methods(model)
    assert methods[0].state.merges >= len(methods)  # every patched layer merged
    assert changed.shape == dense.shape or name == "vit"
    unpatch_model(model)
    assert torch.equal(tm.run(name, model), dense)


def test_merge_then_unmerge_keeps_shapes_and_duplicates_lose_nothing():
    torch.manual_seed(0)
    distinct = torch.randn(2, 9, 5)
    merge = bipartite_merge(distinct, 0, alternate_destinations(9, 1), protected=1)
    assert torch.equal(merge.unmerge(merge.merge(distinct)[0]), distinct)  # r=0: identity
    # tokens 1, 3, 5 are copies of 2, 4, 6: those merge first (cosine 1), and unmerging gives everything back
    copies = distinct.clone()
    copies[:, [1, 3, 5]] = copies[:, [2, 4, 6]]
    merge = bipartite_merge(copies, 3, alternate_destinations(9, 1), protected=1)
    merged, sizes = merge.merge(copies)
    assert merged.shape == (2, 6, 5) and sizes.tolist() == [[1, 2, 2, 2, 1, 1]] * 2
    assert torch.equal(merge.unmerge(merged), copies)
    assert torch.equal(merged[:, 0], copies[:, 0])  # [CLS] stays first, untouched
    pruned, kept_sizes = merge.merge(copies, mode="prune")
    assert torch.equal(pruned, copies[:, [0, 2, 4, 6, 7, 8]]) and bool((kept_sizes == 1).all())


def test_grid_destinations_one_per_tile():
    destinations = grid_destinations(6, 4, (2, 2), torch.Generator().manual_seed(0)).view(6, 4)
    tiles = destinations.view(3, 2, 2, 2).sum((1, 3))
    assert bool((tiles == 1).all())
    strided = grid_destinations(4, 4, (2, 2), randomise=False).view(4, 4)
    assert strided[::2, ::2].all() and int(strided.sum()) == 4


def test_proportional_attention_is_its_definition_and_equals_attention_over_the_duplicates():
    model = tm.build("vit")
    patch_model(model, "token_merge", r=2)
    method = patched_methods(model)[0]
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 6, 16).unbind(0)
    sizes = torch.tensor([[1.0, 3.0, 1.0, 2.0, 1.0, 1.0], [2.0, 1.0, 1.0, 1.0, 4.0, 1.0]])
    method.state.sizes = sizes
    call = AttentionCall(module=None, query=q, key=k, value=v, mask=None, causal=False, scaling=0.25)
    # definition: softmax(q k^T s + log size_j) v
    logits = q @ k.transpose(-1, -2) * 0.25 + sizes.log()[:, None, None, :]
    assert torch.allclose(method._proportional(call), logits.softmax(-1) @ v, atol=1e-5)
    # meaning: a key of size n attends as n identical keys would
    repeats = sizes.long()
    expanded = [(torch.repeat_interleave(k[b], repeats[b], dim=1), torch.repeat_interleave(v[b], repeats[b], dim=1))
                for b in range(2)]
    for b, (kb, vb) in enumerate(expanded):
        reference = naive_attention(q[b:b + 1], kb[None], vb[None], None, causal=False, scaling=0.25)
        assert torch.allclose(method._proportional(call)[b:b + 1], reference, atol=1e-5)


def test_vit_token_counts_default_r_and_cls_kept():
    model = tm.build("vit")  # 16 patches + [CLS], 2 layers
    model(pixel_values=tm.pixels(), output_hidden_states=True)  # transformers installs its capture hooks first
    patch_model(model, "token_merge", r=3)
    out = model(pixel_values=tm.pixels(), output_hidden_states=True)
    assert [h.shape[1] for h in out.hidden_states] == [17, 14, 11]
    assert out.last_hidden_state.shape[1] == 11
    unpatch_model(model)
    patch_model(model, "token_merge")  # unset r: half of the 16 mergeable tokens gone after the last layer
    assert model(pixel_values=tm.pixels()).last_hidden_state.shape[1] == 17 - 8
    assert patched_methods(model)[0].protected == 1
    unpatch_model(model)
    patch_model(model, "token_merge", r=3, mode="prune", layer_params={0: {"r": 0}})
    assert model(pixel_values=tm.pixels()).last_hidden_state.shape[1] == 14


@pytest.mark.parametrize("name", ENCODERS)
def test_merge_sits_between_attention_and_mlp_as_in_tome(name):
    """A patched layer's output is ToMe's layer: x' = merge(x) after the attention's residual add,
    then x' + mlp(norm(x')), with the MLP run on the merged tokens only."""
    model = tm.build(name)
    site = patch_model(model, "token_merge", r=3) and patched_methods(model)[0].site
    unpatch_model(model)
    layer = model.get_submodule(f"{site.tower}.{site.layer}")
    norm, mlp = site.parts.norm_and_mlp(site, "the test")
    seen = {}

    def record(key, value):  # hooks that return None change nothing
        seen.setdefault(key, value)

    norm.register_forward_pre_hook(lambda m, args: record("x", args[0]))  # before the merge's own hook
    mlp.register_forward_hook(lambda m, args, out: record("mlp_tokens", args[0].shape[1]))
    patch_model(model, "token_merge", r=3)
    method = patched_methods(model)[0]
    norm.register_forward_pre_hook(lambda m, args: record("merge", method.state and method.state.pending))
    layer.register_forward_hook(lambda m, args, out: record("out", out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        tm.run(name, model)
        merged, _ = seen["merge"].merge(seen["x"])
        reference = merged + mlp(norm(merged))
    assert seen["mlp_tokens"] == seen["x"].shape[1] - 3  # the MLP ran on the merged tokens
    assert torch.allclose(seen["out"], reference, atol=1e-5)
    assert method.state.mlp_merges == method.state.merges
    unpatch_model(model)
    patch_model(model, "token_merge", r=3, placement="output")  # after the whole layer: the MLP sees every token
    seen.clear()
    tm.run(name, model)
    assert seen["mlp_tokens"] == seen["x"].shape[1] and patched_methods(model)[0].state.mlp_merges == 0


@pytest.mark.parametrize("name", ["vit", "dit"])
def test_batch_rows_merge_as_they_would_alone(name):
    model = tm.build(name)
    patch_model(model, "token_merge", **({"r": 4} if name == "vit" else {"destinations": "strided"}))
    if name == "vit":
        pixels = tm.pixels()
        both = model(pixel_values=pixels).last_hidden_state
        alone = torch.cat([model(pixel_values=pixels[i:i + 1]).last_hidden_state for i in range(2)])
    else:
        sample, t, labels = torch.randn(2, 4, 8, 8), torch.tensor([3, 7]), torch.tensor([1, 2])
        both = model(sample, timestep=t, class_labels=labels).sample
        alone = torch.cat([model(sample[i:i + 1], timestep=t[i:i + 1], class_labels=labels[i:i + 1]).sample
                           for i in range(2)])
    assert torch.allclose(both, alone, atol=1e-5)


@pytest.mark.parametrize("name", DIFFUSION)
def test_diffusion_attention_sees_the_merged_image_tokens_only(name):
    model = tm.build(name)  # 8x8 latent, patch 2: 16 image tokens
    patch_model(model, "token_merge", ratio=0.5)
    lengths = []
    for method in patched_methods(model):
        def recording(call, attend=method.attention):
            lengths.append(call.query.shape[-2])
            return attend(call)
        method.attention = recording
    tm.run(name, model)
    # half of the 16 image tokens; SD3 joins its 5 text tokens, untouched, in the same attention
    assert set(lengths) == ({8 + 5} if name == "sd3" else {8})


def test_llava_language_model_reads_the_merged_image_tokens():
    from test_matrix import llava_inputs

    model = tm.build("llava")  # vision feature layer -2 = the output of layer 0 of 2; [CLS] dropped
    ids, mask, pixels = llava_inputs(model)
    patch_model(model, "token_merge", r=3)
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    assert out.logits.shape[1] == ids.shape[1] - 3  # 16 placeholders per image -> 13
    batch = model.generate(ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=3, do_sample=False)
    alone = model.generate(ids[:1], attention_mask=mask[:1], pixel_values=pixels[:1], max_new_tokens=3, do_sample=False)
    assert batch.shape[1] == ids.shape[1] - 3 + 3 and torch.equal(batch[:1], alone)
    unpatch_model(model)
    assert model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits.shape[1] == ids.shape[1]


def test_errors_name_the_problem():
    with pytest.raises(PatchError, match="bidirectional"):
        patch_model(tm.build("llama"), "token_merge")
    clip = tm.build("clip")
    with pytest.raises(PatchError, match="causal"):
        patch_model(clip, "token_merge", towers=["text_model.encoder.layers"])
    patch_model(clip, "token_merge", r=2)
    assert all("vision" in m.site.tower for m in patched_methods(clip))  # images only by default
    with pytest.raises(PatchError, match="ratio"):
        patch_model(tm.build("dit"), "token_merge", ratio=1.0)
    vit = tm.build("vit")
    for layer in vit.layers:
        layer.feed_forward = layer.mlp  # a layout the merge does not know
        del layer.mlp
    with pytest.raises(PatchError, match="placement='output'"):
        patch_model(vit, "token_merge", r=2)
    assert not patched_methods(vit)  # the failed patch left nothing behind
