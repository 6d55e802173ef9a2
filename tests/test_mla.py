"""mla: exact at full rank, the latent against a direct complex-SVD projection, rotation commuting
with the latent (why the cache can hold it after RoPE), keys before RoPE against their projection
rotated again at the cached positions, cache bytes, padded generate, save/reload, attention
transfer, errors."""

import math
import warnings

import pytest
import tiny_models as tm
import torch

from attnpatch import PatchError, load_patched, patch_model, patched_methods, save_patched, unpatch_model
from attnpatch.ops.latent import (POSITION_COLUMNS, apply_rope, compress_keys, compress_values, expand_keys,
                                  expand_values, key_factors, output_metric, position_columns, positions_from_columns,
                                  query_energy, value_factors)
from attnpatch.runtime.cache import cache_nbytes
from attnpatch.runtime.modes import attention_transfer
from method_cases import MatrixCase

MATRIX_CASES = {"mla": MatrixCase(["llama"], {"rank": 16}, cache_layer="LatentKVLayer")}

FULL = 2 * 16  # kv heads x head_dim of the tiny decoders


@pytest.mark.parametrize("keys", ["pre_rope", "rotated"])
@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3"])  # qwen2: k/v biases, qwen3: key norm before RoPE
def test_full_rank_is_the_dense_model_and_lower_ranks_change_it(name, keys):
    model = tm.build(name)
    dense = tm.run(name, model, left_pad=3)
    patch_model(model, "mla", rank=FULL, keys=keys)
    assert torch.allclose(tm.run(name, model, left_pad=3), dense, atol=1e-5)
    unpatch_model(model)
    patch_model(model, "mla", rank=FULL // 4, keys=keys)
    assert (tm.run(name, model, left_pad=3) - dense).abs().max() > 1e-2
    assert all(method.calls > 0 for method in patched_methods(model))
    unpatch_model(model)
    assert torch.equal(tm.run(name, model, left_pad=3), dense)


def rotate(keys, angles):
    """RoPE's rotate_half rotation of (B, H, L, D) keys by per-(L, frequency) angles."""
    half = keys.shape[-1] // 2
    cos, sin = angles.cos(), angles.sin()
    real, imag = keys[..., :half], keys[..., half:]
    return torch.cat([real * cos - imag * sin, imag * cos + real * sin], dim=-1)


def test_latent_is_the_complex_svd_projection_and_commutes_with_rope():
    torch.manual_seed(0)
    heads, dim, inputs, pairs = 3, 8, 20, 5
    weight = torch.randn(heads * dim, inputs)
    down, up, slots = key_factors(weight, None, heads, pairs, full_rank_pairs=1)
    assert slots[0].all() and int(slots.sum()) == pairs  # the fastest frequency whole, then by singular value
    keys = torch.randn(2, heads, 7, dim)
    rebuilt = expand_keys(compress_keys(keys, down, slots), up, slots)
    # the reference, one frequency at a time: project the heads' complex pair onto the kept singular vectors
    half = dim // 2
    singular = []
    for f in range(half):
        m = torch.complex(weight.reshape(heads, 2, half, inputs)[:, 0, f], weight.reshape(heads, 2, half, inputs)[:, 1, f])
        u, s, _ = torch.linalg.svd(m, full_matrices=False)
        singular.append(s)
        z = torch.complex(keys[..., f], keys[..., f + half])  # (B, H, L)
        kept = u[:, slots[f]]
        projected = torch.einsum("hs,gs,bgl->bhl", kept, kept.conj(), z)
        assert torch.allclose(rebuilt[..., f], projected.real, atol=1e-5)
        assert torch.allclose(rebuilt[..., f + half], projected.imag, atol=1e-5)
    chosen = torch.stack(singular)[1:][slots[1:]]
    dropped = torch.stack(singular)[1:][~slots[1:]]
    assert chosen.min() >= dropped.max()
    angles = torch.rand(7, half) * 2 * math.pi
    assert torch.allclose(expand_keys(compress_keys(rotate(keys, angles), down, slots), up, slots),
                          rotate(rebuilt, angles), atol=1e-5)


def test_attention_weighted_start_keeps_logits_and_outputs_better_than_plain_pca():
    """init='attention' minimises the error that attention sees (each key coordinate weighted by the
    energy of the queries reading it, each value by W_o^T W_o of its readers); on the same keys, values
    and rank it must beat the plain principal components on that measure, and stay exact at full rank."""
    torch.manual_seed(0)
    heads, kv_heads, dim, inputs = 4, 2, 8, 24
    half = dim // 2
    x = torch.randn(4000, inputs) * torch.linspace(0.2, 3, inputs)  # anisotropic inputs
    augmented = torch.cat([x, torch.ones(len(x), 1)], 1).double()
    covariance = augmented.T @ augmented / len(x)
    k_weight, v_weight = torch.randn(kv_heads * dim, inputs), torch.randn(kv_heads * dim, inputs)
    q_weight = torch.randn(heads * dim, inputs) * torch.rand(heads * dim, 1) ** 3  # some frequencies barely queried
    o_weight = torch.randn(inputs, heads * dim) * torch.rand(1, heads * dim) ** 3
    keys, values = ((x @ w.T).reshape(1, -1, kv_heads, dim).transpose(1, 2) for w in (k_weight, v_weight))
    energy = query_energy(q_weight, None, heads, kv_heads, covariance)  # (F, kv_heads)
    metric = output_metric(o_weight, heads, kv_heads).float()
    assert torch.allclose(energy[1, 0].float(), ((x @ q_weight.T).reshape(-1, heads, 2, half)[:, :2, :, 1] ** 2).sum((1, 2)).mean(), rtol=1e-3)

    def key_error(weights, pairs):
        down, up, slots = key_factors(k_weight, None, kv_heads, pairs, 0, covariance, weights)
        error = expand_keys(compress_keys(keys, down, slots), up, slots) - keys  # (1, kv, L, D)
        per_frequency = (error[..., :half] ** 2 + error[..., half:] ** 2).mean(2)[0].T  # (F, kv)
        return float((per_frequency * energy.float()).sum())

    def value_error(use_metric, rank):
        down, up = value_factors(v_weight, None, rank, covariance, metric if use_metric else None)
        error = (expand_values(compress_values(values, down), up, kv_heads) - values).transpose(1, 2).flatten(2)[0]
        return float(torch.einsum("li,ij,lj->", error, metric, error) / len(error))

    assert key_error(energy, 3) < 0.9 * key_error(None, 3)
    assert value_error(True, 5) < 0.9 * value_error(False, 5)
    assert key_error(energy, kv_heads * half) < 1e-6 * key_error(None, 3)
    assert value_error(True, kv_heads * dim) < 1e-6 * value_error(False, 5)


def test_keys_before_rope_are_their_projection_rotated_again_at_the_cached_positions():
    """keys='pre_rope': a key rebuilt from the latent is R(p) U U^T R(p)^-1 k with U the top principal
    directions of the unrotated keys and R(p) RoPE at the token's position, in the cache as without."""
    model = tm.build("llama")
    patch_model(model, "mla", rank=10, keys="pre_rope")
    method = patched_methods(model)[1]
    module, rotary = method.site.module, model.model.rotary_emb
    ids, mask = tm.text_batch(length=9, left_pad=2)
    seen = {}
    module.register_forward_hook(lambda m, a, k, out: seen.update(hidden=k["hidden_states"],
                                                                    positions=k["position_ids"]), with_kwargs=True)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=False)
        x, positions = seen["hidden"], seen["positions"].expand(2, -1)
        unrotated = module.k_proj(x).unflatten(-1, (2, 16)).transpose(1, 2)  # (B, kv heads, L, D)
        cos, sin = rotary(unrotated, positions)
        keys = apply_rope(unrotated, cos, sin)
        down = module.attnpatch_key_down  # (rank, kv*D) rows orthonormal: the projection's top left singular vectors
        assert torch.allclose(down @ down.T, torch.eye(10), atol=1e-5)
        flat = unrotated.transpose(1, 2).flatten(2)
        reference = apply_rope((flat @ down.T @ down).unflatten(-1, (2, 16)).transpose(1, 2), cos, sin)
        latent_keys, _ = method.compress(keys, keys)
        assert torch.equal(positions_from_columns(latent_keys[..., -POSITION_COLUMNS:]), positions)
        assert torch.allclose(method.expand(latent_keys, latent_keys[..., :10])[0], reference, atol=1e-5)
        assert (reference - keys).abs().max() > 1e-2  # rank 10 of 32 does change the keys


def test_positions_cached_beside_the_latent_are_exact_in_half_precision():
    positions = torch.tensor([[0, 1, 255, 256, 4095, 131071, 16_000_000]])
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert torch.equal(positions_from_columns(position_columns(positions, dtype)), positions)
    with pytest.raises(ValueError, match="positions must lie"):
        position_columns(torch.tensor([[2 ** 24]]), torch.float32)


@pytest.mark.parametrize("keys", ["pre_rope", "rotated"])
def test_cache_holds_the_latent_and_padded_generate_matches_rows_alone(keys):
    model = tm.build("llama")
    ids, mask = tm.text_batch(length=20, left_pad=4)

    _, dense_cache = tm.generate_with_cache(model, ids, mask)
    patch_model(model, "mla", rank=8, keys=keys)
    out, cache = tm.generate_with_cache(model, ids, mask)
    extra = POSITION_COLUMNS if keys == "pre_rope" else 0  # each token's position, for RoPE on the rebuilt keys
    assert type(cache.layers[0]).__name__ == "LatentKVLayer" and cache.layers[0].keys.shape[-1] == 8 + extra
    assert cache_nbytes(cache) * 64 == cache_nbytes(dense_cache) * (16 + extra)  # 8 of 32 dims for keys and values
    if keys == "pre_rope":  # the unpadded row's cached positions are 0..25 (20 prompt + 6 new tokens, the last not cached)
        assert torch.equal(positions_from_columns(cache.layers[0].keys[1:, :, :, -extra:])[0], torch.arange(25))
    uncached = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                              use_cache=False)
    assert torch.equal(out, uncached)  # the latent cache changes memory, not the function
    alone, _ = tm.generate_with_cache(model, ids[:1, 4:], mask[:1, 4:])
    assert torch.equal(out[0, 4:], alone[0])
    unpatch_model(model)  # keys and values may take different ranks
    patch_model(model, "mla", rank=8, value_rank=24, keys=keys)
    _, cache = tm.generate_with_cache(model, ids, mask)
    assert cache.layers[0].values.shape[-1] == 24
    assert cache_nbytes(cache) * 64 == cache_nbytes(dense_cache) * (32 + extra)


@pytest.mark.parametrize("name", ["mistral", "gemma2"])
def test_sliding_window_layers_keep_the_models_cache_and_rebuild_its_keys_at_their_positions(name):
    """On a model's own sliding-window layers mla keeps no latent (the window bounds that cache) but still
    attends to keys rebuilt from it, the window's older keys at the positions just before the new token:
    decoding token by token through the cache gives the logits of one forward over the whole text."""
    from transformers import DynamicCache

    from attnpatch.runtime.cache import cache_kwargs

    model = tm.build(name)
    ids, _ = tm.text_batch(length=20)
    patch_model(model, "mla", rank=8)
    with torch.no_grad():
        whole = model(input_ids=ids, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sliding-window layers keep their own (bounded) cache", once per process
            steps = [model(input_ids=ids[:, :12], **cache_kwargs(model, cache)).logits]
            steps += [model(input_ids=ids[:, i : i + 1], **cache_kwargs(model, cache)).logits for i in range(12, 20)]
    assert torch.allclose(torch.cat(steps, dim=1), whole, atol=1e-5)
    latent = [type(layer).__name__ == "LatentKVLayer" for layer in cache.layers]
    assert latent == ([False] * 3 if name == "mistral" else [False, True, False])  # gemma2: layer 1 is full attention
    assert all(method.calls > 0 for method in patched_methods(model))


@pytest.mark.parametrize("keys", ["pre_rope", "rotated"])
def test_saved_factors_reload_and_transfer_trains_them(tmp_path, keys):
    model = tm.build("qwen2")
    patch_model(model, "mla", rank=12, keys=keys, **({"rope_dims": 2} if keys == "rotated" else {}))
    method = patched_methods(model)[0]
    if keys == "rotated":
        assert method.site.module.attnpatch_key_slots[0].all()  # rope_dims=2: the fastest pair whole in each head
    ids, _ = tm.text_batch()
    for p in model.parameters():
        p.requires_grad_(False)
    trained = [p for n, p in model.named_parameters() if "attnpatch_" in n]
    assert len(trained) == 4 * 3
    for p in trained:
        p.requires_grad_(True)
    with attention_transfer(attention_ce=0.1) as losses:
        model(input_ids=ids, use_cache=False)
    assert len(losses) == 3 and all(float(loss.detach()) > 0 for loss in losses)
    sum(losses).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
    with torch.no_grad():
        for p in trained:
            p.add_(0.01 * p.grad.sign())
    changed = tm.run("qwen2", model)
    save_patched(model, tmp_path / "mla")
    reloaded = load_patched(tmp_path / "mla").eval()
    assert torch.allclose(tm.run("qwen2", reloaded), changed, atol=1e-6)


def test_errors_name_the_problem():
    model = tm.build("llama")
    before = tm.run("llama", model)
    rotated = {"keys": "rotated"}
    for params, match in (({"rank": 33, **rotated}, "even and at most"), ({"rank": 64}, "at most kv heads x head_dim = 32"),
                          ({"rank": 8, "rope_dims": 6, **rotated}, "rope_dims x kv heads"),
                          ({"rope_dims": 3, **rotated}, "must be even"), ({"rope_dims": 2}, "applies to keys='rotated'"),
                          ({"keys": "post"}, "pre_rope")):
        with pytest.raises(PatchError, match=match):
            patch_model(model, "mla", **params)
    assert torch.equal(tm.run("llama", model), before)
    del model.model.rotary_emb  # keys before RoPE need the model's rotary embedding; a failed patch changes nothing
    with pytest.raises(PatchError, match="has none at model.rotary_emb; use keys='rotated'"):
        patch_model(model, "mla")
    assert not patched_methods(model) and not [n for n, _ in model.named_parameters() if "attnpatch" in n]
    assert not any(m._forward_pre_hooks for m in model.modules())
    with pytest.raises(PatchError, match="fused qkv"):
        patch_model(tm.build("phi3"), "mla")
    with pytest.raises(PatchError, match="supports \\['decoder'\\]"):
        patch_model(tm.build("vit"), "mla")


def test_calibration_starts_the_latent_from_the_measured_activations():
    """Principal components of the measured keys and values keep more of them than the projections'
    SVD: the rebuilt K/V of the calibration batches are closer, and so are the outputs."""
    from attnpatch.analysis.activation_calibration import calibrate_from_activations
    from attnpatch.runtime.modes import observe_attention

    model = tm.build("llama")
    with torch.no_grad():  # trained models' hidden states are far from isotropic: give the tiny one outlier channels
        model.model.embed_tokens.weight[:, :4] *= 30
    batches = [torch.randint(3, tm.V - 2, (2, 24), generator=torch.Generator().manual_seed(s)) for s in range(4)]
    with torch.no_grad():
        dense = [model(input_ids=b).logits for b in batches]

    def kv_error():
        errors = []

        def observe(call, out):
            rebuilt = patched_methods(model)[call.module.layer_idx].rebuilt(call)
            errors.append(float((rebuilt.key - call.key).pow(2).sum() + (rebuilt.value - call.value).pow(2).sum()))
            return out

        with torch.no_grad(), observe_attention(observe):
            logits = [model(input_ids=b, use_cache=False).logits for b in batches]
        return sum(errors), sum(float((a - b).abs().max()) for a, b in zip(logits, dense))

    patch_model(model, "mla", rank=8)
    svd_error, svd_output = kv_error()
    assert calibrate_from_activations(model, batches, progress=False) == {"tokens": 4 * 2 * 24, "layers": 3}
    calibrated_error, calibrated_output = kv_error()
    assert calibrated_error < 0.8 * svd_error and calibrated_output < svd_output
    with pytest.raises(PatchError, match="patched with mla"):
        calibrate_from_activations(tm.build("llama"), batches)
