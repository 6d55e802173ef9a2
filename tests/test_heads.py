"""Head pruning: physical removal = masking the same heads, plain-transformers reload, GQA rules,
head importance scores against independent references, pruning plans."""

import math

import pytest
import tiny_models as tm
import torch

from attnpatch import (
    PatchError,
    compact_heads,
    greedy_head_pruning,
    head_importance,
    load_patched,
    patch_model,
    save_patched,
    unpatch_model,
)
from attnpatch.adapters import find_adapter
from method_cases import MatrixCase, fewer_parameters

MATRIX_CASES = {"prune_heads": MatrixCase(["llama", "vit"], patch={"layers": [0], "layer_params": {0: {"heads": [0, 1]}}},
                                          structural=True, check=fewer_parameters)}

# (model, {layer: query heads removed}); tiny decoders have 4 query heads in 2 kv groups of 2
CASES = {
    "llama": {0: [1], 1: [2, 3], 2: [0, 2, 3]},  # uneven group / whole group / both kinds
    "qwen3": {0: [0, 1], 2: [3]},
    "gemma2": {1: [0, 3]},
    "vit": {0: [0, 1, 2], 1: [3]},
    "clip": {0: [2], 1: [0, 1]},  # both towers: text and vision
}


def _out_projections(model):
    _, sites = find_adapter(model)
    return [(site, getattr(site.module, site.heads.projections[3])) for site in sites]


def masked_output(name, model, removed):
    """The model's output with the removed heads' outputs zeroed before the output projection."""
    hooks = []
    for site, out in _out_projections(model):
        heads = removed.get(site.layer, [])

        def zero(module, args, heads=heads, size=site.head_dim):
            x = args[0].unflatten(-1, (-1, size)).clone()
            x[..., heads, :] = 0
            return (x.flatten(-2),)

        hooks.append(out.register_forward_pre_hook(zero))
    try:
        return tm.run(name, model)
    finally:
        for hook in hooks:
            hook.remove()


def prune(model, removed):
    return patch_model(model, "prune_heads", layers=sorted(removed),
                       layer_params={layer: {"heads": heads} for layer, heads in removed.items()})


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(CASES))
def test_pruning_equals_masking_and_unpatch_restores(name):
    model = tm.build(name)
    removed = CASES[name]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reference, masked = tm.run(name, model), masked_output(name, model, removed)
    params = n_params(model)
    prune(model, removed)
    assert torch.allclose(tm.run(name, model), masked, atol=1e-5, rtol=0)
    assert n_params(model) < params
    unpatch_model(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(tm.run(name, model), reference)


def test_shapes_and_parameter_count_follow_the_gqa_rules():
    model = tm.build("llama")  # 4 query heads, 2 kv heads, head_dim 16, hidden 64
    params = n_params(model)
    prune(model, CASES["llama"])
    layers = model.model.layers
    # layer 0: head 1 gone, its group keeps head 0 plus a zero slot (groups stay equal): 4 query slots
    assert layers[0].self_attn.q_proj.out_features == 64 and layers[0].self_attn.k_proj.out_features == 32
    # layer 1: heads 2, 3 are the whole second group: the kv head goes too
    assert layers[1].self_attn.q_proj.out_features == 32 and layers[1].self_attn.k_proj.out_features == 16
    assert layers[1].self_attn.num_key_value_groups == 2
    # layer 2: heads 0 | 2, 3: one group with head 1 left
    assert layers[2].self_attn.q_proj.out_features == 16 and layers[2].self_attn.num_key_value_groups == 1
    per_head = 2 * 16 * 64  # q rows + o columns
    per_kv = 2 * 16 * 64  # k + v rows
    assert n_params(model) == params - (2 + 3) * per_head - (1 + 1) * per_kv
    # the config carries the widest layer: 2 kv groups of 2 (layer 0)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim) == (4, 2, 16)


@pytest.mark.parametrize("name", ["llama", "vit", "clip"])
def test_saved_pruned_model_reloads_with_plain_transformers(tmp_path, name):
    model = tm.build(name)
    removed = {0: [0, 1], 1: [0, 1], 2: [2, 3]} if name == "llama" else {0: [1, 2], 1: [0, 3]}
    prune(model, removed)
    expected, pruned_params = tm.run(name, model), n_params(model)
    model.save_pretrained(tmp_path)
    extra = {"add_pooling_layer": False} if name == "vit" else {}  # as tiny_models builds it
    reloaded = type(model).from_pretrained(tmp_path, **extra).eval()  # plain transformers, no attnpatch involved
    assert torch.allclose(tm.run(name, reloaded), expected, atol=1e-6, rtol=0)
    if name == "llama":  # every layer lost the same group: the checkpoint is as small as the model
        assert (reloaded.config.num_attention_heads, reloaded.config.num_key_value_heads) == (2, 1)
        assert n_params(reloaded) == pruned_params
    if name == "clip":  # CLIP sizes heads from hidden_size: the checkpoint keeps zero heads
        assert reloaded.config.vision_config.num_attention_heads == 4
    removed_found = compact_heads(reloaded)
    assert n_params(reloaded) == pruned_params
    assert torch.allclose(tm.run(name, reloaded), expected, atol=1e-6, rtol=0)
    if name == "clip":  # the zero heads sit after each layer's kept heads
        assert removed_found == {"text_model.encoder.layers": {0: [2, 3], 1: [2, 3]},
                                 "vision_model.encoder.layers": {0: [2, 3], 1: [2, 3]}}


def test_uneven_layers_pad_the_checkpoint_and_state_dict_round_trips(tmp_path):
    model = tm.build("llama")
    prune(model, CASES["llama"])
    state = model.state_dict()
    assert state["model.layers.2.self_attn.q_proj.weight"].shape == (64, 64)  # padded to the config geometry
    assert model.model.layers[2].self_attn.q_proj.weight.shape == (16, 64)
    expected = tm.run("llama", model)
    model.load_state_dict(state)  # the padded form loads back into the pruned modules
    assert torch.equal(tm.run("llama", model), expected)
    save_patched(model, tmp_path)
    reloaded = load_patched(tmp_path)  # compacts the zero heads again
    assert [layer.self_attn.q_proj.out_features for layer in reloaded.model.layers] == [64, 32, 16]
    assert torch.allclose(tm.run("llama", reloaded), expected, atol=1e-6, rtol=0)


def test_other_methods_stack_on_a_pruned_model_and_survive_save_load(tmp_path):
    model = tm.build("llama")
    prune(model, {0: [2, 3], 1: [0, 1], 2: [2, 3]})
    patch_model(model, "sliding_window", window=4)
    expected = tm.run("llama", model)
    save_patched(model, tmp_path)
    reloaded = load_patched(tmp_path)
    assert torch.allclose(tm.run("llama", reloaded), expected, atol=1e-6, rtol=0)
    assert reloaded.model.layers[0].self_attn.k_proj.out_features == 16


def test_errors_name_the_problem():
    model = tm.build("llama")
    with pytest.raises(PatchError, match="removing all 4 heads of model.layers\\[0\\]"):
        prune(model, {0: [0, 1, 2, 3]})
    with pytest.raises(PatchError, match=r"heads \[7\] are out of range .* \(valid: 0..3\)"):
        prune(model, {1: [7]})
    with pytest.raises(PatchError, match="no heads to remove"):
        patch_model(model, "prune_heads")
    with pytest.raises(PatchError, match="fused qkv"):
        prune(tm.build("phi3"), {0: [1]})
    with pytest.raises(PatchError, match="supports \\['decoder', 'encoder'\\]"):
        patch_model(tm.build("dit"), "prune_heads", heads=[0])
    patch_model(model, "sliding_window", window=4)
    with pytest.raises(PatchError, match="apply prune_heads first"):
        prune(model, {0: [1]})
    unpatch_model(model)
    reference = tm.run("llama", model)
    with pytest.raises(PatchError):
        prune(model, {0: [1], 2: [9]})  # the second layer fails: the first must be rolled back
    assert torch.equal(tm.run("llama", model), reference)
    assert model.model.layers[0].self_attn.q_proj.out_features == 64


# --- importance
def _batches():
    return [torch.randint(3, tm.V - 2, (2, 14), generator=torch.Generator().manual_seed(s)) for s in range(2)]


def test_gradient_and_output_norm_match_gates_on_the_output_projection():
    model = tm.build("llama")
    batches = _batches()
    importance = head_importance(model, batches, progress=False)
    grads, norms = torch.zeros(3, 4), torch.zeros(3, 4)
    for ids in batches:
        gates = [torch.ones(2, 4, requires_grad=True) for _ in range(3)]
        hooks = []
        for i, layer in enumerate(model.model.layers):
            out = layer.self_attn.o_proj

            def gated(module, args, i=i, gates=gates):
                heads = args[0].unflatten(-1, (4, 16))  # (B, L, H, D)
                blocks = module.weight.unflatten(1, (4, 16))
                contribution = torch.einsum("blhd,ohd->bhlo", heads.detach(), blocks.detach()).norm(dim=-1)
                norms[i] += contribution.mean(-1).sum(0)
                return ((heads * gates[i][:, None, :, None]).flatten(-2),)

            hooks.append(out.register_forward_pre_hook(gated))
        logits = model(ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        for i, g in enumerate(torch.autograd.grad(loss.mean(1).sum(), gates)):
            grads[i] += g.abs().sum(0)
        for hook in hooks:
            hook.remove()
    assert torch.allclose(importance.scores["gradient"]["model.layers"], grads / 4, rtol=1e-4, atol=1e-7)
    assert torch.allclose(importance.scores["output_norm"]["model.layers"], norms / 4, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())
    assert not model.__dict__.get("_attnpatch_record")  # the temporary routing is gone


def test_entropy_score_matches_eager_attention_weights():
    model = tm.build("llama")
    ids = _batches()[0]
    importance = head_importance(model, [ids], scores=["entropy"], progress=False)
    model.set_attn_implementation("eager")
    attentions = model(ids, output_attentions=True).attentions
    model.set_attn_implementation("sdpa")
    expected = torch.zeros(3, 4)
    for layer, weights in enumerate(attentions):  # (B, H, L, L), causal: row i sees i + 1 keys
        entropy = -(weights * weights.clamp_min(1e-30).log()).sum(-1)
        visible = torch.arange(1, ids.shape[1] + 1).float()
        focus = torch.where(visible > 1, 1 - entropy / visible.clamp_min(2).log(), torch.ones_like(entropy))
        expected[layer] = focus.mean(-1).mean(0)
    assert torch.allclose(importance.scores["entropy"]["model.layers"], expected, atol=1e-5)


def test_importance_on_encoders_and_with_masked_heads():
    clip = tm.build("clip")
    ids, mask = tm.text_batch(length=10)
    importance = head_importance(clip, [{"input_ids": ids, "attention_mask": mask, "pixel_values": tm.pixels()}],
                                 progress=False)
    assert importance.towers == ["text_model.encoder.layers", "vision_model.encoder.layers"]
    assert all(bool((t > 0).all()) for t in importance.scores["gradient"].values())
    with pytest.raises(PatchError, match="several attention stacks"):
        importance.plan(0.5)
    vit = tm.build("vit")
    with pytest.raises(PatchError, match="pass loss_fn"):
        head_importance(vit, [{"pixel_values": tm.pixels()}], progress=False)
    loss = lambda model, batch, output: output.last_hidden_state.pow(2).mean((1, 2))
    masked = head_importance(vit, [{"pixel_values": tm.pixels()}], loss_fn=loss, progress=False,
                             removed={"layers": {1: [0, 2]}}, scores=["gradient", "output_norm"])
    grads = masked.scores["gradient"]["layers"]
    assert grads.shape == (2, 4) and bool((grads > 0).all())
    # the plan counts the masked heads as removed already (they rank lowest whatever their score)
    plan = masked.plan(0.5, score="output_norm")
    assert plan.layer_params[1]["heads"] == [0, 2]


def test_plans_follow_scope_unit_and_ratio(tmp_path):
    model = tm.build("llama")
    importance = head_importance(model, _batches(), progress=False)
    scores = importance.scores["gradient"]["model.layers"]
    layer = importance.plan(0.5, scope="layer")
    assert all(len(p["heads"]) == 2 for p in layer.layer_params.values())
    assert layer.layer_params[0]["heads"] == sorted(torch.argsort(scores[0])[:2].tolist())
    group = importance.plan(0.5, scope="layer", unit="group")
    assert all(p["heads"] in ([0, 1], [2, 3]) for p in group.layer_params.values())
    balanced = importance.plan(0.5, balanced=True)  # one head of each 2-head group
    for layer, params in balanced.layer_params.items():
        assert [h // 2 for h in params["heads"]] == [0, 1]
        assert all(scores[layer, h] <= scores[layer, h ^ 1] for h in params["heads"])
    patch_model(model, balanced)
    assert all(layer.self_attn.q_proj.out_features == 32 for layer in model.model.layers)  # no zero padding
    unpatch_model(model)
    with pytest.raises(PatchError, match="scope='layer' and unit='query'"):
        importance.plan(0.5, balanced=True, unit="group")
    glob = importance.plan(0.75, scope="global")
    assert sum(len(p["heads"]) for p in glob.layer_params.values()) == 9
    assert all(len(p["heads"]) <= 3 for p in glob.layer_params.values())  # every layer keeps a head
    assert importance.plan(0.5, score="random", seed=3).to_dict() == importance.plan(0.5, score="random", seed=3).to_dict()
    patch_model(model, glob)  # a plan is a valid patch
    with pytest.raises(PatchError, match=r"in \[0, 1\)"):
        importance.plan(1.0)
    with pytest.raises(PatchError, match="unknown score 'size'"):
        importance.plan(0.5, score="size")
    assert "| 0 |" in importance.table() and not math.isnan(float(importance.table().split("|")[-2]))
    assert importance.plot(tmp_path / "heads.png").stat().st_size > 5000  # three heat maps


def test_greedy_pruning_reaches_the_ratio_in_steps():
    model = tm.build("llama")
    config, last = greedy_head_pruning(model, _batches(), ratio=0.5, steps=3, progress=False)
    assert sum(len(p["heads"]) for p in config.layer_params.values()) == 6
    assert last.removed  # the last round scored with earlier choices masked
    earlier = {layer: set(h) for layer, h in last.removed["model.layers"].items()}
    final = {layer: set(p["heads"]) for layer, p in config.layer_params.items()}
    assert all(earlier[layer] <= final.get(layer, set()) for layer in earlier)


def test_importance_finds_the_heads_built_to_matter_and_not():
    """Planted structure: in layer 1, head 2's output projection is zeroed (removing it changes nothing)
    and head 3's is scaled up 20x (it dominates the layer's output). Every score but entropy must rank
    head 2 lowest and head 3 highest in that layer, and the first head a global plan removes is head 2."""
    model = tm.build("llama")
    with torch.no_grad():
        blocks = model.model.layers[1].self_attn.o_proj.weight.unflatten(1, (4, 16))
        blocks[:, 2] = 0
        blocks[:, 3] *= 20
    importance = head_importance(model, _batches(), scores=["gradient", "output_norm"], progress=False)
    for score in ("gradient", "output_norm"):
        layer = importance.scores[score]["model.layers"][1]
        assert float(layer[2]) == 0.0 and int(layer.argmax()) == 3, (score, layer)
    plan = importance.plan(1 / 12, score="output_norm", scope="global")
    assert plan.layer_params == {1: {"heads": [2]}}, plan.layer_params
