"""kv_merge (GQA/MQA conversion): the fused model against a model built with fewer kv heads from
averaged weights by hand, exactness where merging loses nothing, cache bytes, plain-transformers
reload, padded generate, attention transfer, errors."""

import pytest
import tiny_models as tm
import torch
from transformers import AutoModelForCausalLM

from attnpatch import PatchError, load_patched, patch_model, patched_methods, save_patched, unpatch_model
from attnpatch.recipes.config import StageConfig
from attnpatch.recipes.model_setup import train_only
from attnpatch.runtime.cache import cache_nbytes
from attnpatch.runtime.modes import attention_transfer
from method_cases import MatrixCase, MatrixRun, fewer_parameters


def fewer_kv_heads(run: MatrixRun) -> None:
    """Structural: fewer kv heads in the projections and in the cache itself (2 -> 1 halves it)."""
    fewer_parameters(run)
    assert all(layer.keys.shape[1] == 1 for layer in run.cache.layers)
    float32_bytes = cache_nbytes(run.cache) * 4 // run.cache.layers[0].keys.element_size()
    assert float32_bytes * 2 == run.dense_cache_bytes()


MATRIX_CASES = {"kv_merge": MatrixCase(["llama"], {"kv_heads": 1}, structural=True, check=fewer_kv_heads)}

D = 16  # head_dim of the tiny decoders


def duplicate_kv_heads(model, pairs):
    """Make kv head b of every layer a copy of kv head a, for each (a, b): merging them is then exact."""
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                for a, b in pairs:
                    proj.weight[b * D:(b + 1) * D] = proj.weight[a * D:(a + 1) * D]


def hand_merged(model, kv_heads):
    """The reference: a fresh model with `kv_heads` kv heads whose k/v weights are the mean of each
    run of adjacent original kv heads, every other weight copied."""
    config = model.config.__class__(**{**model.config.to_dict(), "num_key_value_heads": kv_heads})
    reference = type(model)(config).eval()
    state = model.state_dict()
    for i in range(config.num_hidden_layers):
        for name in ("k_proj", "v_proj"):
            key = f"model.layers.{i}.self_attn.{name}.weight"
            w = state[key]
            state[key] = w.reshape(kv_heads, -1, D, w.shape[-1]).mean(1).reshape(kv_heads * D, -1)
    reference.load_state_dict(state)
    return reference


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_merging_equals_a_model_built_with_fewer_kv_heads(name):
    model = tm.build(name)
    before = tm.run(name, model)
    reference = hand_merged(model, 1)
    patch_model(model, "kv_merge", kv_heads=1)
    merged = tm.run(name, model)
    assert torch.allclose(merged, tm.run(name, reference), atol=1e-5)
    assert (merged - before).abs().max() > 1e-3  # the two kv heads differ: merging changed the model
    assert model.config.num_key_value_heads == 1 and model.model.layers[0].self_attn.num_key_value_groups == 4
    unpatch_model(model)
    assert torch.equal(tm.run(name, model), before) and model.config.num_key_value_heads == 2


def test_exact_where_nothing_is_lost():
    model = tm.build("llama")
    before = tm.run("llama", model)
    patch_model(model, "kv_merge", kv_heads=2)  # no merging at all
    assert torch.equal(tm.run("llama", model), before)
    unpatch_model(model)
    duplicate_kv_heads(model, [(0, 1)])  # both kv heads equal: one head holds everything
    before = tm.run("llama", model)
    for fusion in ("mean", "first"):
        patch_model(model, "kv_merge", kv_heads=1, fusion=fusion)
        assert torch.allclose(tm.run("llama", model), before, atol=1e-6)
        unpatch_model(model)


def test_pca_fusion_is_exact_where_nothing_is_lost_and_beats_the_mean_from_activations(tmp_path):
    from attnpatch.analysis.activation_calibration import calibrate_from_activations

    model = tm.build("qwen2")  # biases on q, k, v: they turn with their rows
    dense = tm.run("qwen2", model, left_pad=3)
    patch_model(model, "kv_merge", kv_heads=2, fusion="pca")  # groups of one head: a change of coordinates
    assert torch.allclose(tm.run("qwen2", model, left_pad=3), dense, atol=1e-5)
    original_out = patched_methods(model)[0]._original["o_proj"].weight  # the values turned onto their components
    assert (model.model.layers[0].self_attn.o_proj.weight - original_out).abs().max() > 1e-3
    unpatch_model(model)
    duplicate_kv_heads(model, [(0, 1)])
    dense = tm.run("qwen2", model, left_pad=3)
    patch_model(model, "kv_merge", kv_heads=1, fusion="pca")  # equal heads: one principal direction holds them
    assert torch.allclose(tm.run("qwen2", model, left_pad=3), dense, atol=1e-5)
    unpatch_model(model)

    model = tm.build("llama")
    with torch.no_grad():  # outlier channels, as trained models have: where activation statistics matter
        model.model.embed_tokens.weight[:, :4] *= 30
    batches = [torch.randint(3, tm.V - 2, (2, 24), generator=torch.Generator().manual_seed(s)) for s in range(4)]
    dense = tm.run("llama", model)
    errors = {}
    for fusion in ("mean", "pca"):
        patch_model(model, "kv_merge", kv_heads=1, fusion=fusion)
        if fusion == "pca":
            assert calibrate_from_activations(model, batches, progress=False) == {"tokens": 192, "layers": 3}
        errors[fusion] = float((tm.run("llama", model) - dense).abs().max())
        if fusion == "pca":
            merged = tm.run("llama", model)
            save_patched(model, tmp_path / "pca")
            plain = AutoModelForCausalLM.from_pretrained(tmp_path / "pca").eval()
            assert plain.config.num_key_value_heads == 1
            assert torch.allclose(tm.run("llama", plain), merged, atol=1e-5)
        unpatch_model(model)
    assert errors["pca"] < 0.5 * errors["mean"], errors
    assert torch.equal(tm.run("llama", model), dense)
    with pytest.raises(PatchError, match="normalises"):
        patch_model(tm.build("qwen3"), "kv_merge", fusion="pca")


def test_similarity_grouping_fuses_the_alike_heads():
    """4 kv heads where 0 = 2 and 1 = 3: similarity groups (0, 2) and (1, 3) and loses nothing,
    neighbours (0, 1) and (2, 3) do; the query heads move with their kv heads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**tm._decoder_common(), "num_attention_heads": 8,
                                            "num_key_value_heads": 4, "hidden_size": 128})).eval()
    duplicate_kv_heads(model, [(0, 2), (1, 3)])
    ids, mask = tm.text_batch()
    before = model(input_ids=ids, attention_mask=mask).logits
    patch_model(model, "kv_merge", kv_heads=2, grouping="similarity")
    assert patched_methods(model)[0].groups == [(0, 2), (1, 3)]
    assert torch.allclose(model(input_ids=ids, attention_mask=mask).logits, before, atol=1e-5)
    unpatch_model(model)
    patch_model(model, "kv_merge", kv_heads=2, grouping="adjacent")
    assert (model(input_ids=ids, attention_mask=mask).logits - before).abs().max() > 1e-3
    unpatch_model(model)
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, before)


def test_cache_holds_fewer_kv_heads_and_padded_generate_matches_rows_alone():
    model = tm.build("llama")
    ids, mask = tm.text_batch(length=20, left_pad=4)

    _, dense_cache = tm.generate_with_cache(model, ids, mask)
    patch_model(model, "kv_merge", kv_heads=1)
    out, cache = tm.generate_with_cache(model, ids, mask)
    assert cache.layers[0].keys.shape[1] == 1
    assert cache_nbytes(cache) * 2 == cache_nbytes(dense_cache)  # 2 kv heads -> 1: half the bytes, same tokens
    alone, _ = tm.generate_with_cache(model, ids[:1, 4:], mask[:1, 4:])
    assert torch.equal(out[0, 4:], alone[0])
    alone, _ = tm.generate_with_cache(model, ids[1:], mask[1:])
    assert torch.equal(out[1], alone[0])


def test_saved_model_reloads_with_plain_transformers_and_uneven_layers_round_trip(tmp_path):
    model = tm.build("llama")
    patch_model(model, "kv_merge", kv_heads=1)
    merged = tm.run("llama", model)
    save_patched(model, tmp_path / "even")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "even").eval()
    assert plain.config.num_key_value_heads == 1 and plain.model.layers[0].self_attn.k_proj.out_features == D
    assert torch.allclose(tm.run("llama", plain), merged, atol=1e-6)
    unpatch_model(model)

    patch_model(model, "kv_merge", layers=[1])  # layers 0 and 2 keep 2 kv heads: layer 1 is saved repeated
    merged = tm.run("llama", model)
    assert model.config.num_key_value_heads == 2
    save_patched(model, tmp_path / "uneven")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "uneven").eval()
    assert torch.allclose(tm.run("llama", plain), merged, atol=1e-6)
    reloaded = load_patched(tmp_path / "uneven").eval()  # the repeats are fused again: the cache shrinks
    assert [layer.self_attn.k_proj.out_features for layer in reloaded.model.layers] == [2 * D, D, 2 * D]
    assert torch.allclose(tm.run("llama", reloaded), merged, atol=1e-6)
    state = model.state_dict()  # and the module loads its own (repeated) state dict back
    model.load_state_dict(state)
    assert torch.equal(tm.run("llama", model), merged)


def test_attention_transfer_compares_with_the_original_heads_and_trains_the_fused_projections():
    model = tm.build("llama")
    ids, _ = tm.text_batch()
    dense = model(input_ids=ids).logits
    patch_model(model, "kv_merge", kv_heads=1)
    train_only(model, "stage1", StageConfig())  # what a recipe's stage 1 trains
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(3) for p in "kv"}
    with attention_transfer() as losses:
        out = model(input_ids=ids, use_cache=False).logits
    assert len(losses) == 3 and all(float(loss.detach()) > 0 for loss in losses)
    assert torch.allclose(out, dense, atol=1e-5)  # the teacher's output passes on: each layer sees dense inputs
    sum(losses).backward()
    k_proj = model.model.layers[0].self_attn.k_proj
    assert k_proj.weight.grad is not None and k_proj.weight.grad.abs().sum() > 0
    with pytest.raises(PatchError, match="attention_ce"):
        with attention_transfer(attention_ce=0.5):
            model(input_ids=ids, use_cache=False)


def test_errors_name_the_problem_and_leave_the_model_as_it_was():
    model = tm.build("llama")
    before = tm.run("llama", model)
    with pytest.raises(PatchError, match=r"must divide 2 \(valid: \[1, 2\]\)"):
        patch_model(model, "kv_merge", kv_heads=3)
    with pytest.raises(PatchError, match="each must divide the widest"):
        _uneven_geometry()
    assert torch.equal(tm.run("llama", model), before) and model.config.num_key_value_heads == 2
    with pytest.raises(PatchError, match="fused qkv"):
        patch_model(tm.build("phi3"), "kv_merge")
    with pytest.raises(PatchError, match="supports \\['decoder'\\]"):
        patch_model(tm.build("vit"), "kv_merge")


def _uneven_geometry():
    """6 kv heads merged to 2 in one layer and 3 in the others: 2 does not divide 3."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**{**tm._decoder_common(), "num_attention_heads": 6,
                                            "num_key_value_heads": 6, "hidden_size": 96})).eval()
    ids, _ = tm.text_batch()
    before = model(input_ids=ids).logits
    try:
        patch_model(model, "kv_merge", kv_heads=3, layer_params={0: {"kv_heads": 2}})
    finally:  # the failed patch undid itself
        assert torch.equal(model(input_ids=ids).logits, before) and model.config.num_key_value_heads == 6
