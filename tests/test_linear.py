"""The `linear` method (its matrix row here; the chunked kernel in test_ops.py) and its
flash-linear-attention backend: its Triton kernel needs a GPU (eval/gpu/check.py
holds it to the torch path there), so here the kernel is replaced by its documented contract, which
checks everything attnpatch does around it: layout, GQA, the carried state, padding, the handoff to
decoding, the dispatch and its errors."""

import importlib.util
from pathlib import Path

import pytest
import tiny_models as tm
import torch
from transformers import DynamicCache

from attnpatch import PatchError, patch_model, patched_methods, unpatch_model
from attnpatch.ops.linear import LinearState, causal_linear_attention
from attnpatch.ops.linear_fla import FLA_MIN_TOKENS, fla_causal_linear_attention, fla_kernel
from attnpatch.runtime.cache import cache_kwargs
from method_cases import MatrixCase, MatrixRun

def decodes_from_a_constant_state(run: MatrixRun) -> None:
    """Decoders: every layer's cache holds no keys or values, only the state S (B, Hkv, F, Dv) and z
    (B, Hkv, F), F = head_dim for elu: a size that does not grow with the tokens seen."""
    if run.cache is None:
        return
    cfg = run.model.config
    b, hkv, d = len(run.prompt_lengths), cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    for layer in run.cache.layers:
        assert layer.keys.shape[-2] == 0 and layer.values.shape[-2] == 0
        assert tuple(layer.state.kv.shape) == (b, hkv, d, d) and tuple(layer.state.k_sum.shape) == (b, hkv, d)
        assert layer.seen_tokens == run.dense_cache_tokens


MATRIX_CASES = {"linear": MatrixCase(["llama", "vit"], {"feature_map": "elu", "chunk_size": 4}, cache_layer=None,
                                     check=decodes_from_a_constant_state)}

HAS_FLA = importlib.util.find_spec("fla") is not None and fla_kernel() is not None


def fla_reference():
    """flash-linear-attention's own pure-torch reference of linear attention (fla/ops/linear_attn/naive.py),
    loaded by path: `fla.ops` imports its Triton kernels, which a CPU machine lacks. None without fla."""
    spec = importlib.util.find_spec("fla")
    naive = spec and Path(spec.submodule_search_locations[0]) / "ops" / "linear_attn" / "naive.py"
    if not naive or not naive.exists():
        return None
    module_spec = importlib.util.spec_from_file_location("fla_linear_attn_naive", naive)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


FLA_REFERENCE = fla_reference()
needs_fla_reference = pytest.mark.skipif(FLA_REFERENCE is None, reason="needs flash-linear-attention (fla-core) "
                                         "installed: .ci/run installs it, as the README's test command does")


def contract_kernel(q, k, v, scale=None, initial_state=None, output_final_state=False, normalize=True):
    """fla.ops.linear_attn.chunk_linear_attn as documented (flash-linear-attention 0.6), token by token
    in float64: (B, T, H, F) features, as many key heads as query heads, T >= H;
    o_t = scale q_t (S_0 + sum_{j<=t} k_j v_j^T), divided by scale q_t (z_0 + sum_{j<=t} k_j) when
    normalize; the state (S, z) with z shaped (B, 1, H, F) when normalize, else S alone."""
    b, t, h, f = q.shape
    assert k.shape == q.shape and v.shape[:3] == (b, t, h) and t >= h, "fla's layout: (B, T, H, F), same heads"
    scale = f**-0.5 if scale is None else scale
    kv0, z0 = initial_state if normalize else (initial_state, None)
    s = torch.zeros(b, h, f, v.shape[-1], dtype=torch.float64) if kv0 is None else kv0.double().clone()
    z = torch.zeros(b, h, f, dtype=torch.float64) if z0 is None else z0.double()[:, 0].clone()
    out = []
    for i in range(t):
        s += k[:, i, :, :, None].double() * v[:, i, :, None, :].double()
        z += k[:, i].double()
        o = torch.einsum("bhf,bhfv->bhv", q[:, i].double() * scale, s)
        if normalize:
            o = o / ((q[:, i].double() * scale * z).sum(-1, keepdim=True) + 1e-10)
        out.append(o)
    o = torch.stack(out, dim=1).to(q.dtype)
    final = (s.float(), z[:, None].float()) if normalize else s.float()
    return o, final if output_final_state else None


def test_fla_path_equals_the_torch_path_with_gqa_state_and_padding():
    g = torch.Generator().manual_seed(0)
    b, hq, hkv, length, f, dv = 2, 4, 2, 70, 16, 8
    fq, fk = torch.rand(b, hq, length, f, generator=g), torch.rand(b, hkv, length, f, generator=g)
    v = torch.randn(b, hkv, length, dv, generator=g)
    state = LinearState(kv=torch.randn(b, hkv, f, dv, generator=g), k_sum=torch.rand(b, hkv, f, generator=g) * 5)
    valid = torch.ones(b, length, dtype=torch.bool)
    valid[1, :6] = False
    want, want_state = causal_linear_attention(fq, fk, v, state=state, key_valid=valid, chunk_size=16)
    got, got_state = fla_causal_linear_attention(fq, fk, v, state=state, key_valid=valid, kernel=contract_kernel)
    assert got.shape == want.shape == (b, hq, length, dv) and got.stride(1) == dv  # the (B, L, H, D) layout
    assert (got - want).abs().max() <= 1e-5
    assert torch.allclose(got_state.kv, want_state.kv, atol=1e-4)
    assert torch.allclose(got_state.k_sum, want_state.k_sum, atol=1e-5)
    assert got_state.kv.shape == (b, hkv, f, dv)  # one state per kv head, as the cache keeps it


def test_a_model_prefills_on_the_kernel_and_decodes_from_its_state(monkeypatch):
    """With the kernel (and a GPU) granted, `fla` prefills on it, the cache carries its state and the
    decoded logits equal the torch backend's; `auto` stays on torch (measured faster on an H200)."""
    import attnpatch.methods.linear.linear as linear_method
    import attnpatch.ops.linear_fla as linear_fla

    model = tm.build("llama")
    ids, _ = tm.text_batch(length=FLA_MIN_TOKENS + 6)
    prompt, steps = ids[:, :FLA_MIN_TOKENS], ids[:, FLA_MIN_TOKENS:]
    logits, backends = {}, {}
    for backend in ("torch", "auto", "fla"):
        if backend == "auto":
            monkeypatch.setattr(linear_method, "fla_unusable_reason", lambda fq: None)
            monkeypatch.setattr(linear_method, "fla_kernel", lambda: contract_kernel)
            monkeypatch.setattr(linear_fla, "fla_kernel", lambda: contract_kernel)
        patch_model(model, "linear", feature_map="hedgehog", backend=backend)
        with torch.no_grad():
            cache = DynamicCache(config=model.config)
            out = [model(input_ids=prompt, **cache_kwargs(model, cache)).logits]
            backends[backend] = {m.last_backend for m in patched_methods(model)}
            out += [model(input_ids=steps[:, i:i + 1], **cache_kwargs(model, cache)).logits
                    for i in range(steps.shape[1])]
        logits[backend] = torch.cat(out, dim=1)
        unpatch_model(model)
    assert backends == {"torch": {"torch"}, "auto": {"torch"}, "fla": {"fla"}}
    assert torch.equal(logits["auto"], logits["torch"])
    assert (logits["fla"] - logits["torch"]).abs().max() <= 1e-4


def test_auto_stays_on_torch_off_a_gpu():
    model = tm.build("llama")
    patch_model(model, "linear", backend="auto")
    ids, _ = tm.text_batch(length=FLA_MIN_TOKENS + 8)
    with torch.no_grad():
        model(input_ids=ids)
    assert {m.last_backend for m in patched_methods(model)} == {"torch"}


@pytest.mark.skipif(HAS_FLA, reason="flash-linear-attention is installed here")
def test_fla_by_name_without_it_fails_and_leaves_the_model():
    model = tm.build("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PatchError, match=r"attnpatch\[fla\]"):
        patch_model(model, "linear", backend="fla")
    assert not patched_methods(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.skipif(not HAS_FLA, reason="needs flash-linear-attention installed")
def test_fla_by_name_refuses_a_cpu_prefill_by_name():
    model = tm.build("llama")
    patch_model(model, "linear", backend="fla")
    ids, _ = tm.text_batch(length=FLA_MIN_TOKENS)
    with pytest.raises(RuntimeError, match="CUDA tensors"), torch.no_grad():
        model(input_ids=ids)


def test_lolcats_has_no_fla_backend():
    with pytest.raises(PatchError, match="backend"):
        patch_model(tm.build("llama"), "lolcats", backend="fla")


@needs_fla_reference
def test_the_contract_is_flas_own_reference():
    """fla's pure-torch reference (runs on CPU) agrees with the contract the tests hold the mapping to."""
    naive_recurrent_linear_attn = FLA_REFERENCE.naive_recurrent_linear_attn

    g = torch.Generator().manual_seed(0)
    q, k = torch.rand(1, 40, 4, 16, generator=g), torch.rand(1, 40, 4, 16, generator=g)
    v, s0 = torch.randn(1, 40, 4, 8, generator=g), torch.randn(1, 4, 16, 8, generator=g)
    z0 = torch.rand(1, 1, 4, 16, generator=g) * 3
    for normalize, state in ((False, s0), (True, (s0, z0))):
        want, want_state = naive_recurrent_linear_attn(q, k, v, initial_state=state, output_final_state=True,
                                                       scale=1.0, normalize=normalize)
        got, got_state = contract_kernel(q, k, v, scale=1.0, initial_state=state, output_final_state=True,
                                         normalize=normalize)
        assert torch.allclose(got, want, atol=1e-4)
        for mine, theirs in zip(got_state if normalize else [got_state], want_state if normalize else [want_state]):
            assert torch.allclose(mine, theirs, atol=1e-4)


@needs_fla_reference
def test_the_torch_path_equals_flas_reference_with_gqa_and_a_carried_state():
    """attnpatch's chunked linear attention (the CPU path, and the default on GPUs) against fla's own
    reference directly: normalised, a state carried in and out, kv heads repeated for fla's layout."""
    g = torch.Generator().manual_seed(1)
    b, hq, hkv, length, f, dv = 2, 4, 2, 70, 16, 8
    fq, fk = torch.rand(b, hq, length, f, generator=g), torch.rand(b, hkv, length, f, generator=g)
    v = torch.randn(b, hkv, length, dv, generator=g)
    state = LinearState(kv=torch.randn(b, hkv, f, dv, generator=g), k_sum=torch.rand(b, hkv, f, generator=g) * 5)
    ours, ours_state = causal_linear_attention(fq, fk, v, state=state, chunk_size=16)
    groups = hq // hkv
    as_fla = [t.repeat_interleave(groups, dim=1).transpose(1, 2) for t in (fk, v)]  # (B, T, Hq, F)
    initial = (state.kv.repeat_interleave(groups, dim=1), state.k_sum.repeat_interleave(groups, dim=1)[:, None])
    theirs, (kv, k_sum) = FLA_REFERENCE.naive_recurrent_linear_attn(
        fq.transpose(1, 2), *as_fla, scale=1.0, initial_state=initial, output_final_state=True, normalize=True)
    assert (ours - theirs.transpose(1, 2)).abs().max() <= 1e-4
    assert torch.allclose(ours_state.kv.repeat_interleave(groups, dim=1), kv, atol=1e-4)
    assert torch.allclose(ours_state.k_sum.repeat_interleave(groups, dim=1), k_sum[:, 0], atol=1e-4)
