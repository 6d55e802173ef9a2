"""The cache layer of KV compression methods: only the entries a method keeps, per sequence and
kv head, with their positions and validity."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from ...ops.kv_select import gather_tokens
from .base import FullLengthGeometry, MappedBatchOps, no_tokens


class CompressedKVLayer(FullLengthGeometry, MappedBatchOps, DynamicLayer):
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
        self.keys = no_tokens(key_states)
        self.values = no_tokens(value_states)
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
