"""Cache layers for transformers 5 `generate()` that keep a method's own decoding state.

A patched attention module whose method keeps state (linear attention) swaps the plain
DynamicLayer of its layer for `RecurrentStateLayer` the first time it sees the cache: from then on
`update` stores no keys or values, only counts tokens, and the method keeps a fixed-size state on
the layer. The layer still reports the full sequence length, so masks and positions of the other
layers stay right.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer


class RecurrentStateLayer(DynamicLayer):
    """Holds `state` (any object with `nbytes` and tensors kv/k_sum) instead of growing K/V."""

    is_croppable = False

    def __init__(self, sliding_window: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.seen_tokens = 0
        self.state = None
        # when it replaces a sliding-window layer it keeps reporting that layer's mask geometry,
        # so masks built for the model's other sliding layers stay right
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None

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

    def past_length(self, new_tokens: int) -> int:
        """Tokens absorbed into the state before the current call's `new_tokens`."""
        return self.seen_tokens - new_tokens

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.sliding_window is None:
            return self.seen_tokens + query_length, 0
        offset = max(self.seen_tokens - self.sliding_window + 1, 0)
        return min(self.seen_tokens, self.sliding_window - 1) + query_length, offset

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

    def _map_state(self, fn) -> None:
        if self.state is not None:
            self.state = type(self.state)(**{k: fn(v) for k, v in self.state.__dict__.items()})

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_state(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_state(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_state(lambda t: t[indices, ...])

    def offload(self):
        self._map_state(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        if self.is_initialized:
            self._map_state(lambda t: t.to(self.device, non_blocking=True))


def state_layer_for(cache: Cache, layer_idx: int) -> RecurrentStateLayer | None:
    """The layer's RecurrentStateLayer, swapping in a fresh one for an empty dynamic layer.

    Returns None when the layer already holds keys (a cache filled before patching, or a static
    cache): the method then sees the full K/V and computes from them, which is still exact.
    """
    layers = cache.layers
    if getattr(cache, "layer_class_to_replicate", None) is not None:
        while len(layers) <= layer_idx:
            layers.append(cache.layer_class_to_replicate())
    if layer_idx >= len(layers):
        return None
    layer = layers[layer_idx]
    if isinstance(layer, RecurrentStateLayer):
        return layer
    if type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) and layer.get_seq_length() == 0:
        layers[layer_idx] = RecurrentStateLayer(sliding_window=getattr(layer, "sliding_window", None))
        return layers[layer_idx]
    return None


def cache_nbytes(cache: Cache) -> int:
    """Bytes held by a cache: stored keys and values plus any recurrent state."""
    total = 0
    for layer in cache.layers:
        if isinstance(layer, RecurrentStateLayer):
            total += layer.nbytes
            continue
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total
