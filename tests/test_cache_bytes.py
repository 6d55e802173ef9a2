"""cache_nbytes counts everything a cache keeps alive: after generate() with every cache-keeping
method, it equals the bytes of the distinct tensor storages reachable from the cache object (a view
that keeps a larger tensor alive, or a working copy left out of the count, would break this)."""

import pytest
import torch
from transformers import DynamicCache

import tiny_models as tm
from attnpatch import cache_kwargs, cache_nbytes, patch_model, unpatch_model


def reachable_storage_bytes(root) -> int:
    """Bytes of every distinct tensor storage reachable from `root` through attributes and containers."""
    seen_objects, storages = set(), {}

    def walk(value):
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(value, (list, tuple, set)):
            for item in value:
                walk(item)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif hasattr(value, "__dict__") and id(value) not in seen_objects and not isinstance(value, type):
            seen_objects.add(id(value))
            for item in vars(value).values():
                walk(item)

    walk(root.layers)
    return sum(n for ptr, n in storages.items() if ptr != 0)  # empty tensors own no memory


CASES = [("dense", {}), ("streaming", {"compression": 0.5, "sinks": 2}), ("h2o", {"budget": 6}),
         ("snapkv", {"budget": 6, "window": 2}), ("tova", {"budget": 6}), ("knorm", {"budget": 6}),
         ("kv_quant", {"group": 8, "residual": 2, "sinks": 1}), ("linear", {}), ("lolcats", {"window": 4}),
         ("duo_heads", {"sinks": 1, "window": 4, "layer_params": {0: {"retrieval_heads": [1]}}})]


@pytest.mark.parametrize("method,params", CASES, ids=[c[0] for c in CASES])
def test_cache_nbytes_is_every_byte_the_cache_keeps_alive(method, params):
    model = tm.build("llama")
    if method != "dense":
        patch_model(model, method, **params)
    ids, mask = tm.text_batch(length=20, left_pad=3)
    cache = DynamicCache(config=model.config)
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                   pad_token_id=0, **cache_kwargs(model, cache))
    assert cache_nbytes(cache) == reachable_storage_bytes(cache) > 0
    if method != "dense":
        unpatch_model(model)
