"""The eviction policy's state for one cache layer, owned by the KV compression methods. The cache
layer (runtime/layers/compressed.py) only stores entries; it carries this object for its methods,
maps its tensors with the batch (beam search, batch edits), counts its bytes, and says when it
repacked its slots. Only the methods of this folder and `stop_evicting` change it."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class EvictionState:
    budget: torch.Tensor | None = None  # (B,) entries kept per sequence and kv head; None until the prompt is cut
    decode: str | None = None  # overrides the method's decode policy ("grow" once a compressed context is done)
    pending: int = 0  # decoding steps since the last eviction (a method may evict every few steps)
    # StreamingLLM's (next slot, ring size) once it has checked the slots' layout; False: it never will
    ring: tuple[int, int] | bool | None = None
    replay_scores: torch.Tensor | None = None  # kvzip: the most attention each entry got from a replay

    @property
    def prefilled(self) -> bool:
        return self.budget is not None

    def slots_repacked(self) -> None:
        """The layer moved its entries (kept a subset, truncated, reset): layouts derived from slots are stale."""
        self.ring = None

    def map(self, fn) -> None:
        """Apply a batch edit of the layer (`fn` on the batch dimension) to the per-sequence tensors."""
        self.budget = None if self.budget is None else fn(self.budget)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.budget, self.replay_scores) if t is not None)


def eviction_state(layer) -> EvictionState:
    """The layer's eviction state, made on first use."""
    if layer.policy is None:
        layer.policy = EvictionState()
    return layer.policy


def stop_evicting(layer) -> None:
    """From now on the layer only grows (a compressed context: its questions and answers are kept
    whatever the method's decode policy), with spare slots so appends stay cheap."""
    eviction_state(layer).decode = "grow"
    layer.headroom = True
