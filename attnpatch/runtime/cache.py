"""Finding and equipping the model's KV cache: the transformers `Cache` among a call's arguments,
the keyword a model takes it by, the swap of a dynamic layer for a method's own cache layer
(runtime/layers), and the bytes a cache really holds."""

from __future__ import annotations

import inspect
import itertools

import torch
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

from ..errors import PatchError


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
    forward = inspect.signature(type(model).forward).parameters
    return {"cache" if "cache" in forward else "past_key_values": cache}


def state_layer_for(cache: Cache, layer_idx: int, method):
    """The layer's cache layer of `method` (Method.cache_layer_class), made by
    `method.new_cache_layer` in place of an empty dynamic layer. Returns None only when the method
    declines the layer (leaves it as the model's own, e.g. kv_quant on a sliding-window layer,
    which is bounded already).

    Raises PatchError when the layer cannot be replaced: it already holds tokens written before
    the method saw it (a cache filled before patching), or it is not a dynamic layer (a static or
    offloaded cache). Running on would keep every token, i.e. silently run the dense cache.
    """
    layers, name = cache.layers, method.name
    if getattr(cache, "layer_class_to_replicate", None) is not None:
        while len(layers) <= layer_idx:
            layers.append(cache.layer_class_to_replicate())
    if layer_idx >= len(layers):
        raise PatchError(f"{name}: the {type(cache).__name__} has {len(layers)} layers, none for layer {layer_idx}; "
                         "pass a DynamicCache() (or no cache) to the patched model")
    layer = layers[layer_idx]
    if isinstance(layer, method.cache_layer_class):
        return layer
    made = method.new_cache_layer(sliding_window=getattr(layer, "sliding_window", None))
    if made is None:  # the method leaves this layer as the model's own
        return None
    if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer):
        raise PatchError(f"{name} keeps its own cache layer and can only replace DynamicCache layers; layer "
                         f"{layer_idx} is a {type(layer).__name__}. Pass a DynamicCache() (generate's default) instead")
    if layer.get_seq_length() != 0:
        raise PatchError(f"{name}: layer {layer_idx} of the cache already holds {layer.get_seq_length()} tokens "
                         "written without the method (a cache filled before patching). Start from a fresh "
                         "DynamicCache() after patch_model")
    layers[layer_idx] = made
    return made


def cache_nbytes(cache: Cache) -> int:
    """Bytes held by a cache: stored keys and values plus any recurrent state."""
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
