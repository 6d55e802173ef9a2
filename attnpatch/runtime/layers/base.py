"""What attnpatch's cache layers share: beam-search and batch edits over their tensors, and the
geometry of a layer that stores fewer tokens than it has seen."""

from __future__ import annotations

import torch


class MappedBatchOps:
    """Beam search and batch edits for layers that define `_map(fn)` over their tensors."""

    def _map(self, fn) -> None:
        raise NotImplementedError

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices, ...])


class FullLengthGeometry:
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


def no_tokens(states: torch.Tensor) -> torch.Tensor:
    """An empty (..., 0, D) tensor with its own storage: a zero-length *view* of `states` would keep
    the whole of it (e.g. the prompt's K/V) alive."""
    return states.new_empty(*states.shape[:-2], 0, states.shape[-1])
