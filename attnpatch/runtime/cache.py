"""Cache layers for transformers 5 `generate()` that keep a method's own decoding state.

A patched attention module whose method keeps state (linear attention) swaps the plain
DynamicLayer of its layer for `RecurrentStateLayer` the first time it sees the cache: from then on
`update` stores no keys or values, only counts tokens, and the method keeps a fixed-size state on
the layer. The layer still reports the full sequence length, so masks and positions of the other
layers stay right.
"""

from __future__ import annotations

import inspect
import itertools

import torch
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

from ..errors import PatchError


class _MappedBatchOps:
    """Beam search and batch edits for layers that define `_map(fn)` over their tensors."""

    def _map(self, fn) -> None:
        raise NotImplementedError

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices, ...])


class _FullLengthGeometry:
    """For layers that store fewer tokens than they have seen: report the full sequence length,
    and, when replacing a sliding-window layer, that layer's mask geometry, so positions of new
    tokens and the masks built for the model's other layers stay what they would be."""

    def _init_geometry(self, sliding_window: int | None) -> None:
        self.seen_tokens = 0
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.sliding_window is None:
            return self.seen_tokens + query_length, 0
        offset = max(self.seen_tokens - self.sliding_window + 1, 0)
        return min(self.seen_tokens, self.sliding_window - 1) + query_length, offset


class RecurrentStateLayer(_FullLengthGeometry, _MappedBatchOps, DynamicLayer):
    """Holds `state` (any object with `nbytes` and tensors kv/k_sum) instead of growing K/V."""

    is_croppable = False

    def __init__(self, sliding_window: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self._init_geometry(sliding_window)
        self.state = None

    def lazy_initialization(self, key_states, value_states):
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states[..., :0, :]
        self.values = value_states[..., :0, :]
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.seen_tokens += key_states.shape[-2]
        return key_states, value_states

    def get_max_length(self) -> int:
        return -1

    @property
    def nbytes(self) -> int:
        return 0 if self.state is None else self.state.nbytes

    def reset(self) -> None:
        self.state = None
        self.seen_tokens = 0
        self.keys = self.values = None
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "a recurrent attention state cannot be cropped (tokens are summed into it); "
            "re-run the prompt instead of rolling the cache back"
        )

    def _map(self, fn) -> None:
        if self.state is not None:
            self.state = type(self.state)(**{k: fn(v) for k, v in self.state.__dict__.items()})

    def offload(self):
        self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        if self.is_initialized:
            self._map(lambda t: t.to(self.device, non_blocking=True))


class HybridWindowLayer(RecurrentStateLayer):
    """Window K/V plus a recurrent state (LoLCATs decoding): keys/values of the newest
    `window - 1` tokens stay exact, everything older lives in the method's linear state. `update`
    returns the window plus the new tokens; the method then folds what leaves the window into
    the state and calls `trim`."""

    def __init__(self, window: int, sliding_window: int | None = None, **kwargs):
        super().__init__(sliding_window=sliding_window, **kwargs)
        self.window = window

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.seen_tokens += key_states.shape[-2]
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        return self.keys, self.values

    def trim(self) -> None:
        keep = max(self.window - 1, 0)
        self.keys = self.keys[..., self.keys.shape[-2] - min(keep, self.keys.shape[-2]):, :]
        self.values = self.values[..., self.values.shape[-2] - min(keep, self.values.shape[-2]):, :]

    @property
    def nbytes(self) -> int:
        window = sum(t.numel() * t.element_size() for t in (self.keys, self.values) if isinstance(t, torch.Tensor))
        return window + super().nbytes

    def _map(self, fn) -> None:
        super()._map(fn)
        if isinstance(self.keys, torch.Tensor):
            self.keys, self.values = fn(self.keys), fn(self.values)


class CompressedKVLayer(_FullLengthGeometry, _MappedBatchOps, DynamicLayer):
    """Stores only the K/V entries a compression method keeps, per sequence and per kv head.

    keys/values (B, Hkv, K, D) are the kept entries in their original order; `valid` (B, Hkv, K)
    marks real entries (False for padding, and for spare slots of a sequence that keeps fewer
    than another); `positions` (B, Hkv, K) int32 are their absolute positions (keys are stored
    after RoPE, so positions are only needed for sink/recency rules); `scores` is the method's
    running score where it keeps one (H2O). `budget` (B,) is the per-sequence size kept while
    decoding, set at prefill. The layer reports the full sequence length, so positions of new
    tokens and the masks of other layers are what they would be without compression.
    """

    is_croppable = False

    def __init__(self, sliding_window: int | None = None, **kwargs):
        super().__init__(**kwargs)
        # with a sliding window, the method also keeps applying the model's window
        self._init_geometry(sliding_window)
        self.valid = self.positions = self.scores = self.budget = None

    def lazy_initialization(self, key_states, value_states):
        # set here, not by DynamicLayer, whose fields differ between transformers releases
        self.dtype, self.device, self.is_initialized = key_states.dtype, key_states.device, True
        b, h = key_states.shape[:2]
        self.keys = key_states[..., :0, :]
        self.values = value_states[..., :0, :]
        self.valid = torch.zeros(b, h, 0, dtype=torch.bool, device=key_states.device)
        self.positions = torch.zeros(b, h, 0, dtype=torch.int32, device=key_states.device)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, h, n = key_states.shape[:3]
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.valid = torch.cat([self.valid, self.valid.new_ones(b, h, n)], dim=-1)
        new_positions = torch.arange(self.seen_tokens, self.seen_tokens + n, device=key_states.device, dtype=torch.int32)
        self.positions = torch.cat([self.positions, new_positions.expand(b, h, n)], dim=-1)
        if self.scores is not None:
            self.scores = torch.cat([self.scores, self.scores.new_zeros(b, h, n)], dim=-1)
        self.seen_tokens += n
        return self.keys, self.values

    def keep(self, index: torch.Tensor, valid: torch.Tensor) -> None:
        """Keep only the entries at `index` (B, Hkv, K); the rest is freed."""
        from ..ops.kv_select import gather_tokens

        self.keys = gather_tokens(self.keys, index).contiguous()
        self.values = gather_tokens(self.values, index).contiguous()
        self.positions = torch.gather(self.positions, -1, index)
        if self.scores is not None:
            self.scores = torch.gather(self.scores, -1, index)
        self.valid = valid

    @property
    def stored_tokens(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    @property
    def nbytes(self) -> int:
        tensors = (self.keys, self.values, self.valid, self.positions, self.scores, self.budget)
        return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))

    def reset(self) -> None:
        super().reset()
        self.seen_tokens = 0
        self.valid = self.positions = self.scores = self.budget = None

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a compressed KV cache cannot be rolled back: evicted entries are gone")

    def _map(self, fn) -> None:
        for name in ("keys", "values", "valid", "positions", "scores", "budget"):
            value = getattr(self, name)
            if isinstance(value, torch.Tensor):
                setattr(self, name, fn(value))


class QuantizedKVLayer(DynamicLayer):
    """KV entries stored quantised (KIVI-style), with full-precision sinks and recent residual.

    The first `sinks` tokens stay in full precision; new tokens enter a full-precision residual,
    and whenever it holds `residual + group` tokens its oldest `group` are quantised: keys per
    channel over the group's tokens, values per token over groups of `group` channels. `update`
    returns all keys and values (dequantised) in order, so the model's masks apply unchanged.
    """

    is_croppable = False

    def __init__(self, bits: int = 4, group: int = 32, residual: int = 64, sinks: int = 4, **kwargs):
        super().__init__(**kwargs)
        self.bits, self.group, self.residual, self.sinks = bits, group, residual, sinks
        self.seen_tokens = 0
        self.sink_keys = self.sink_values = None
        self.quant_keys = self.quant_values = None
        self.dequant_keys = self.dequant_values = None  # cache of the dequantised part

    def lazy_initialization(self, key_states, value_states):
        self.dtype, self.device, self.is_initialized = key_states.dtype, key_states.device, True
        self.sink_keys, self.sink_values = key_states[..., :0, :], value_states[..., :0, :]
        self.keys, self.values = key_states[..., :0, :], value_states[..., :0, :]  # the residual

    def update(self, key_states, value_states, *args, **kwargs):
        from ..ops.quant import concat, dequantize, quantize

        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.seen_tokens += key_states.shape[-2]
        room = self.sinks - self.sink_keys.shape[-2]
        if room > 0:
            self.sink_keys = torch.cat([self.sink_keys, key_states[..., :room, :]], dim=-2)
            self.sink_values = torch.cat([self.sink_values, value_states[..., :room, :]], dim=-2)
            key_states, value_states = key_states[..., room:, :], value_states[..., room:, :]
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        flush = (self.keys.shape[-2] - self.residual) // self.group * self.group
        if flush > 0:
            qk = quantize(self.keys[..., :flush, :], self.bits, self.group, "tokens")
            qv = quantize(self.values[..., :flush, :], self.bits, self.group, "channels")
            self.quant_keys = qk if self.quant_keys is None else concat([self.quant_keys, qk])
            self.quant_values = qv if self.quant_values is None else concat([self.quant_values, qv])
            self.keys, self.values = self.keys[..., flush:, :], self.values[..., flush:, :]
            self.dequant_keys = self._extend(self.dequant_keys, dequantize(qk, self.dtype))
            self.dequant_values = self._extend(self.dequant_values, dequantize(qv, self.dtype))
        parts_k = [self.sink_keys] + ([self.dequant_keys] if self.dequant_keys is not None else []) + [self.keys]
        parts_v = [self.sink_values] + ([self.dequant_values] if self.dequant_values is not None else []) + [self.values]
        return torch.cat(parts_k, dim=-2), torch.cat(parts_v, dim=-2)

    @staticmethod
    def _extend(existing, new):
        return new if existing is None else torch.cat([existing, new], dim=-2)

    def get_seq_length(self) -> int:
        return self.seen_tokens

    @property
    def nbytes(self) -> int:
        """Bytes of what is stored: sinks, packed codes with scales, residual. The dequantised
        copy kept for speed is a working buffer, counted apart in `working_nbytes`."""
        total = sum(t.numel() * t.element_size() for t in (self.sink_keys, self.sink_values, self.keys, self.values)
                    if isinstance(t, torch.Tensor))
        return total + sum(q.nbytes for q in (self.quant_keys, self.quant_values) if q is not None)

    @property
    def working_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.dequant_keys, self.dequant_values) if t is not None)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a quantised KV cache cannot be rolled back")

    def reorder_cache(self, beam_idx):
        raise NotImplementedError("beam search is not supported with kv_quant yet")


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


def state_layer_for(cache: Cache, layer_idx: int, layer_class: type = RecurrentStateLayer, factory=None,
                    method: str = "this method"):
    """The layer's attnpatch cache layer, swapping `layer_class` (or what `factory` makes) in for an
    empty dynamic layer. Returns None only when `factory` declines the layer (the method leaves it
    as the model's own, e.g. kv_quant on a sliding-window layer, which is bounded already).

    Raises PatchError when the layer cannot be replaced: it already holds tokens written before
    the method saw it (a cache filled before patching), or it is not a dynamic layer (a static or
    offloaded cache). Running on would keep every token, i.e. silently run the dense cache.
    """
    layers = cache.layers
    if getattr(cache, "layer_class_to_replicate", None) is not None:
        while len(layers) <= layer_idx:
            layers.append(cache.layer_class_to_replicate())
    if layer_idx >= len(layers):
        raise PatchError(f"{method}: the {type(cache).__name__} has {len(layers)} layers, none for layer {layer_idx}; "
                         "pass a DynamicCache() (or no cache) to the patched model")
    layer = layers[layer_idx]
    if isinstance(layer, layer_class):
        return layer
    if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer):
        raise PatchError(f"{method} keeps its own cache layer and can only replace DynamicCache layers; layer "
                         f"{layer_idx} is a {type(layer).__name__}. Pass a DynamicCache() (generate's default) instead")
    if layer.get_seq_length() != 0:
        raise PatchError(f"{method}: layer {layer_idx} of the cache already holds {layer.get_seq_length()} tokens "
                         "written without the method (a cache filled before patching). Start from a fresh "
                         "DynamicCache() after patch_model")
    sliding_window = getattr(layer, "sliding_window", None)
    if factory is not None:
        made = factory(sliding_window=sliding_window)
    else:
        made = layer_class(sliding_window=sliding_window)
    if made is not None:
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
