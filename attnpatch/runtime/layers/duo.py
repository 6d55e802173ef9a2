"""The cache layer of duo_heads: retrieval kv heads keep every token, streaming heads only their
sinks and recent window."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from ...ops.kv_select import leading_invalid
from .base import FullLengthGeometry, MappedBatchOps


class DuoHeadLayer(FullLengthGeometry, MappedBatchOps, DynamicLayer):
    """Cache of one layer under duo_heads: retrieval kv heads store every token (keys/values,
    (B, Hr, L, D)); streaming kv heads store the sinks and the newest window - 1 tokens
    (stream_keys/stream_values (B, Hs, S, D) at absolute `stream_positions`). `valid` (B, L) marks
    real (non-padding) tokens. `update` stores new tokens and returns them; the method reads the
    stores and calls `trim` after attending."""

    is_croppable = False

    def __init__(self, retrieval: list[int], streaming: list[int], sinks: int, window: int,
                 sliding_window: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self._init_geometry(sliding_window)
        self.retrieval, self.streaming = retrieval, streaming
        self.sinks, self.window = sinks, window
        self.stream_keys = self.stream_values = self.stream_positions = self.valid = None

    def lazy_initialization(self, key_states, value_states):
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states[:, self.retrieval, :0]
        self.values = value_states[:, self.retrieval, :0]
        self.stream_keys = key_states[:, self.streaming, :0]
        self.stream_values = value_states[:, self.streaming, :0]
        self.stream_positions = torch.zeros(0, dtype=torch.long, device=key_states.device)
        self.valid = torch.zeros(key_states.shape[0], 0, dtype=torch.bool, device=key_states.device)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        self.keys = torch.cat([self.keys, key_states[:, self.retrieval]], dim=-2)
        self.values = torch.cat([self.values, value_states[:, self.retrieval]], dim=-2)
        self.stream_keys = torch.cat([self.stream_keys, key_states[:, self.streaming]], dim=-2)
        self.stream_values = torch.cat([self.stream_values, value_states[:, self.streaming]], dim=-2)
        new = torch.arange(self.seen_tokens, self.seen_tokens + n, device=self.stream_positions.device)
        self.stream_positions = torch.cat([self.stream_positions, new])
        self.valid = torch.cat([self.valid, self.valid.new_ones(self.valid.shape[0], n)], dim=-1)
        self.seen_tokens += n
        return key_states, value_states

    def mark_new_padding(self, new_valid: torch.Tensor) -> None:
        """new_valid (B or 1, n): which of the tokens of the last update are real (padding is not)."""
        self.valid[:, -new_valid.shape[-1]:] &= new_valid.expand(self.valid.shape[0], -1)

    def trim(self) -> None:
        """Streaming heads keep the sinks and the newest window - 1 tokens (what the next query sees).
        A left-padded sequence's sinks are its first real tokens: every sequence's are kept."""
        positions = self.stream_positions
        first_real = int(leading_invalid(self.valid).max())
        keep = (positions < first_real + self.sinks) | (positions > self.seen_tokens - self.window)
        if self.sliding_window is not None:  # what the model's own window hides from every later query
            keep &= positions > self.seen_tokens - self.sliding_window
        if bool(keep.all()):
            return
        index = keep.nonzero().squeeze(-1)
        self.stream_keys = self.stream_keys.index_select(-2, index).contiguous()
        self.stream_values = self.stream_values.index_select(-2, index).contiguous()
        self.stream_positions = positions[index]

    @property
    def nbytes(self) -> int:
        tensors = (self.keys, self.values, self.stream_keys, self.stream_values, self.stream_positions, self.valid)
        return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = self.stream_keys = self.stream_values = None
        self.stream_positions = self.valid = None
        self.seen_tokens = 0
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a duo_heads cache cannot be rolled back: streaming heads dropped old tokens")

    def _map(self, fn) -> None:
        for name in ("keys", "values", "stream_keys", "stream_values", "valid"):
            value = getattr(self, name)
            if isinstance(value, torch.Tensor):
                setattr(self, name, fn(value))
