"""The cache layer of duo_heads: retrieval kv heads keep every token, streaming heads only their
sinks and recent window."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from ...ops.token_ranks import leading_invalid
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
        self.padded = False  # some stored entry of `valid` is False (only mark_new_padding makes one)
        self.trimmed_at = -1  # seen_tokens at the latest trim: then the store is what the next query sees

    def lazy_initialization(self, key_states, value_states):
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states[:, self.retrieval, :0]
        self.values = value_states[:, self.retrieval, :0]
        self.stream_keys = key_states[:, self.streaming, :0]
        self.stream_values = value_states[:, self.streaming, :0]
        self.stream_positions = torch.zeros(0, dtype=torch.long, device=key_states.device)
        self.valid = torch.zeros(key_states.shape[0], 0, dtype=torch.bool, device=key_states.device)
        self.all_streaming = self.streaming == list(range(key_states.shape[1]))  # sliding_window: no head copies
        self.padded, self.trimmed_at = False, -1
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        # a decoding step is a few tiny tensors per layer, so its cost is its number of kernels: a
        # retrieval store without heads is not touched (the streaming store keeps its length, read by
        # trim, even without heads), and a streaming store of every head takes the states as they are
        if self.retrieval:
            self.keys = torch.cat([self.keys, key_states[:, self.retrieval]], dim=-2)
            self.values = torch.cat([self.values, value_states[:, self.retrieval]], dim=-2)
        keys, values = key_states, value_states
        if not self.all_streaming:
            keys, values = key_states[:, self.streaming], value_states[:, self.streaming]
        self.stream_keys = torch.cat([self.stream_keys, keys], dim=-2)
        self.stream_values = torch.cat([self.stream_values, values], dim=-2)
        new = torch.arange(self.seen_tokens, self.seen_tokens + n, device=self.stream_positions.device)
        self.stream_positions = torch.cat([self.stream_positions, new])
        self.valid = torch.cat([self.valid, self.valid.new_ones(self.valid.shape[0], n)], dim=-1)
        self.seen_tokens += n
        return key_states, value_states

    def mark_new_padding(self, new_valid: torch.Tensor) -> None:
        """new_valid (B or 1, n): which of the tokens of the last update are real (padding is not)."""
        self.valid[:, -new_valid.shape[-1]:] &= new_valid.expand(self.valid.shape[0], -1)
        self.padded = self.padded or not bool(new_valid.all())

    def trim(self) -> None:
        """Streaming heads keep the sinks and the newest window - 1 tokens (what the next query sees).
        A left-padded sequence's sinks are its first real tokens: each row's are kept (the union over the
        batch's rows, a few positions each: a padded batch holds about what its rows hold alone)."""
        positions = self.stream_positions
        self.trimmed_at = self.seen_tokens
        firsts = sorted(set(leading_invalid(self.valid).tolist())) if self.padded else [0]
        # stored positions ascend: what is kept is one run of sinks per distinct row start and one run of recent
        # tokens; the model's own window (if any) hides positions below `oldest`, ours the non-sinks below `recent`
        oldest = 0 if self.sliding_window is None else self.seen_tokens - self.sliding_window + 1
        recent = max(oldest, self.seen_tokens - self.window + 1)
        spans = [(max(oldest, first), first + self.sinks) for first in firsts] + [(recent, self.seen_tokens)]
        merged: list[list[int]] = []
        for lo, hi in sorted(span for span in spans if span[1] > span[0]):
            if merged and lo <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        bounds = torch.tensor([bound for span in merged for bound in span], device=positions.device)
        index = torch.searchsorted(positions, bounds).tolist()
        runs = [(index[i], index[i + 1] - index[i]) for i in range(0, len(index), 2) if index[i + 1] > index[i]]
        if sum(length for _, length in runs) == positions.numel():
            return
        self.stream_keys, self.stream_values = _kept(self.stream_keys, -2, runs), _kept(self.stream_values, -2, runs)
        self.stream_positions = _kept(positions, 0, runs)

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


def _kept(tensor: torch.Tensor, dim: int, runs: list[tuple[int, int]]) -> torch.Tensor:
    """A copy of the (start, length) runs of `tensor` along `dim` (a copy, so that the dropped entries'
    memory is released now, not at the next update)."""
    parts = [tensor.narrow(dim, start, length) for start, length in runs] or [tensor.narrow(dim, 0, 0)]
    return torch.cat(parts, dim=dim) if len(parts) > 1 else parts[0].clone()
