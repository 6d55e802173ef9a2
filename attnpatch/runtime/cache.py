"""Facts about a transformers KV cache: the `Cache` among a call's arguments, the keyword a model takes
it by, and the bytes a cache really holds (the swap of its layers for a method's is routing/cache.py)."""

from __future__ import annotations

import inspect
import itertools

import torch
from transformers.cache_utils import Cache

from ..errors import PatchError
from .wrappers import base_model


def find_cache(args, kwargs):
    """The transformers `Cache` among a call's arguments, found by type: the keyword moved from
    `past_key_values` to `cache` in transformers 5.24 and may move again."""
    for value in itertools.chain(kwargs.values(), args):
        if isinstance(value, Cache):
            return value
    return None


def cache_kwargs(model, cache: Cache) -> dict:
    """{keyword: cache} for this model's forward and generate: `cache` from transformers 5.24,
    `past_key_values` before (5.24 still accepts it, with a deprecation warning)."""
    model = base_model(model)  # a wrapper (peft) passes the keyword on to the model it holds
    forward = inspect.signature(type(model).forward).parameters
    return {"cache" if "cache" in forward else "past_key_values": cache}


def cache_nbytes(cache: Cache) -> int:
    """Bytes held by a cache: stored keys and values plus any recurrent state."""
    if not isinstance(cache, Cache):
        raise PatchError(f"cache_nbytes takes a transformers Cache (e.g. the DynamicCache passed to generate), "
                         f"got {type(cache).__name__}")
    total = 0
    for layer in cache.layers:
        if isinstance(getattr(type(layer), "nbytes", None), property):  # attnpatch's layers know their bytes
            total += layer.nbytes
            continue
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total
