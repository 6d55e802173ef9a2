"""Cache layers of linearized methods: a recurrent state instead of growing K/V (linear), plus an
exact window of the newest keys (lolcats).

A patched attention module whose method keeps state (linear attention) swaps the plain
DynamicLayer of its layer for `RecurrentStateLayer` the first time it sees the cache: from then on
`update` stores no keys or values, only counts tokens, and the method keeps a fixed-size state on
the layer. The layer still reports the full sequence length, so masks and positions of the other
layers stay right.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from .base import FullLengthGeometry, MappedBatchOps, no_tokens


class RecurrentStateLayer(FullLengthGeometry, MappedBatchOps, DynamicLayer):
    """Holds `state` (any object with `nbytes` and tensors kv/k_sum) instead of growing K/V."""

    is_croppable = False

    def __init__(self, sliding_window: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self._init_geometry(sliding_window)
        self.state = None

    def lazy_initialization(self, key_states, value_states):
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = no_tokens(key_states)
        self.values = no_tokens(value_states)
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
        # copies, not views: a view would keep everything before the window alive (the whole prompt)
        self.keys = self.keys[..., self.keys.shape[-2] - min(keep, self.keys.shape[-2]):, :].clone()
        self.values = self.values[..., self.values.shape[-2] - min(keep, self.values.shape[-2]):, :].clone()

    @property
    def nbytes(self) -> int:
        window = sum(t.numel() * t.element_size() for t in (self.keys, self.values) if isinstance(t, torch.Tensor))
        return window + super().nbytes

    def _map(self, fn) -> None:
        super()._map(fn)
        if isinstance(self.keys, torch.Tensor):
            self.keys, self.values = fn(self.keys), fn(self.values)
