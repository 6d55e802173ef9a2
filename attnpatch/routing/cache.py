"""Equipping the model's KV cache for a patched layer: a dynamic layer swapped for the method's own
cache layer (runtime/layers), or a loud error where that cannot be done."""

from __future__ import annotations

from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

from ..errors import PatchError


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
