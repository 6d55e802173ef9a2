"""Never silently dense: a method that needs the KV cache raises when it cannot find or replace it,
and says once when the model runs without one."""

import warnings

import pytest
import tiny_models as tm
import torch
from transformers import DynamicCache, StaticCache

from attnpatch import PatchError, cache_nbytes, patch_model, unpatch_model
from attnpatch.errors import _WARNED
from attnpatch.registry import get_method, resolve_params
from attnpatch.runtime.cache import cache_kwargs
from attnpatch.runtime.call import AttentionCall

KV_METHODS = ["streaming", "h2o", "tova", "knorm", "snapkv", "pyramidkv", "kv_quant"]


class Site:
    layer, num_layers, num_heads, num_kv_heads, head_dim, label = 0, 3, 4, 2, 16, "model.layers[0]"


@pytest.mark.parametrize("method", KV_METHODS)
def test_kv_method_called_without_a_cache_raises(method):
    q, k, v = torch.randn(1, 4, 6, 16), torch.randn(1, 2, 6, 16), torch.randn(1, 2, 6, 16)
    instance = get_method(method)(Site(), **resolve_params(method, {}))
    call = AttentionCall(module=None, query=q, key=k, value=v, mask=None, causal=True, scaling=0.25)
    with pytest.raises(PatchError, match=f"{method} works on the model's KV cache, but this attention call carries none"):
        instance.attention(call)


def _hide_cache_from_attention_modules(monkeypatch):
    """Simulate a transformers release that hands the cache to attention modules in a way attnpatch
    does not know: the modules' own lookup finds nothing, the model's output still carries it."""
    import attnpatch.adapters.hf_transformers as adapter

    real = adapter.find_cache
    monkeypatch.setattr(adapter, "find_cache", lambda args, kwargs: None if kwargs else real(args, kwargs))


@pytest.mark.parametrize("method,params", [("snapkv", {}), ("linear", {}), ("duo_heads", {}), ("kv_quant", {"group": 8})])
def test_a_cache_the_modules_cannot_find_raises_instead_of_running_dense(method, params, monkeypatch):
    ids, mask = tm.text_batch(length=12)
    for name in ("llama", "gemma2"):  # llama passes use_cache to attention; gemma2 does not (model-level check)
        model = tm.build(name)
        patch_model(model, method, **params)
        _hide_cache_from_attention_modules(monkeypatch)
        with pytest.raises(PatchError, match="passes the cache in a way attnpatch does not know"):
            model(input_ids=ids, attention_mask=mask, use_cache=True, **cache_kwargs(model, DynamicCache()))
        monkeypatch.undo()
        model(input_ids=ids, attention_mask=mask, use_cache=True)  # found again: runs
        unpatch_model(model)


def test_a_cache_filled_before_patching_or_a_static_cache_raises():
    model = tm.build("llama")
    ids, mask = tm.text_batch(length=12)
    cache = DynamicCache(config=model.config)
    model(input_ids=ids, attention_mask=mask, use_cache=True, **cache_kwargs(model, cache))
    patch_model(model, "snapkv", compression=0.5)
    with pytest.raises(PatchError, match="already holds 12 tokens written without the method"):
        model(input_ids=ids[:, :1], use_cache=True, **cache_kwargs(model, cache))
    static = StaticCache(config=model.config, max_cache_len=32)
    with pytest.raises(PatchError, match="can only replace DynamicCache layers"):
        model(input_ids=ids, attention_mask=mask, use_cache=True, **cache_kwargs(model, static))


def test_running_without_a_cache_warns_once_and_says_how_to_make_it_real():
    model = tm.build("llama")
    ids, mask = tm.text_batch(length=12)
    dense = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    patch_model(model, "h2o", compression=0.5)
    _WARNED.discard("h2o:no-cache")
    with pytest.warns(UserWarning, match=r"h2o: the model ran without a KV cache \(use_cache=False\).*use_cache=True"):
        out = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert torch.allclose(out, dense, atol=1e-5)  # nothing to compress: exact attention, said so
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(input_ids=ids, attention_mask=mask, use_cache=False)  # once, not at every layer and call
    cache = DynamicCache(config=model.config)
    model(input_ids=ids, attention_mask=mask, use_cache=True, **cache_kwargs(model, cache))
    assert type(cache.layers[0]).__name__ == "CompressedKVLayer" and cache.layers[0].stored_tokens == 6
    assert cache_nbytes(cache) > 0


@pytest.mark.parametrize("name", ["llama", "vit"])
def test_a_module_that_stops_routing_to_attnpatch_raises(name):
    """Simulate a release whose attention modules pick their attention another way: the patched
    module's forward runs without calling attnpatch, which must not pass as the method."""
    model = tm.build(name)
    patch_model(model, "sliding_window", window=3)
    tm.run(name, model)  # routed: fine
    module = next(m for m in model.modules() if "_attnpatch_original_config" in m.__dict__)
    routed, module.config = module.config, module.__dict__["_attnpatch_original_config"]
    with pytest.raises(PatchError, match="ran without calling attnpatch's attention function"):
        tm.run(name, model)
    module.config = routed
    unpatch_model(model)


def test_a_diffusers_processor_that_bypasses_the_routing_raises(monkeypatch):
    import torch.nn.functional as F
    from diffusers.models import attention_processor

    model = tm.build("dit")
    patch_model(model, "linear")
    tm.run("dit", model)
    monkeypatch.setattr(attention_processor, "F", F)  # a processor that calls torch's SDPA directly
    with pytest.raises(PatchError, match="could not route it"):
        tm.run("dit", model)
    monkeypatch.undo()
    unpatch_model(model)
