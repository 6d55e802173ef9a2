"""The normalised attention call every method receives, whatever library the model comes from."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from ..ops.token_ranks import leading_invalid

# What the adapter found about the model's KV cache for this call (AttentionCall.cache_state):
CACHE_OWN = "own"  # the method's own cache layer is attached (cache_layer)
CACHE_ABSENT = "absent"  # the model runs without a cache (use_cache=False): nothing to keep
CACHE_DECLINED = "declined"  # a cache is in use, and the method leaves this layer's entries as they are
CACHE_UNCHECKED = "unchecked"  # nobody looked (a direct call, or a module without decoding hooks)


@dataclass
class AttentionCall:
    """query (B, Hq, Lq, D); key/value (B, Hkv, Lk, D), rotated and already joined with any cache.

    mask: boolean, True = may attend, broadcastable to (B, Hq, Lq, Lk), or None. When None and
    `causal` is set, causality is bottom-right aligned (query i sits at position Lk - Lq + i).
    cache_layer: the method's own cache layer when it keeps decoding state (see cache.py); then
    key/value hold only the new tokens and the layer holds what came before.
    cache_state: one of the CACHE_* values above; methods that need a cache raise on "unchecked".
    """

    module: torch.nn.Module
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    mask: torch.Tensor | None
    causal: bool
    scaling: float
    softcap: float | None = None
    dropout: float = 0.0
    training: bool = False
    cache_layer: Any = None
    cache_state: str = CACHE_UNCHECKED
    model_window: int | None = None  # the model's own sliding window on this layer (Mistral, Gemma2)

    @property
    def kv_groups(self) -> int:
        return self.query.shape[1] // self.key.shape[1]

    def key_valid(self) -> torch.Tensor | None:
        """(B, Lk) bool: keys that some query may attend (False for padding), or None if all are."""
        if self.mask is None:
            return None
        mask = self.mask
        valid = mask.any(dim=-2).any(dim=1)  # (B or 1, Lk)
        if bool(valid.all()):
            return None
        return valid.expand(self.key.shape[0], -1)


    def leading_padding(self) -> torch.Tensor | None:
        """(B,) padding tokens before each row's first real token, when every row's padding is one
        leading run (left padding, as generate() pads); None when nothing is padded or padding
        cannot be told apart from keys the model's own sliding window hides (decoding steps)."""
        valid = self.key_valid()
        if valid is None:
            return None
        lq, lk = self.query.shape[-2], self.key.shape[-2]
        if lq != lk and self.model_window is not None:
            return None
        pads = leading_invalid(valid)
        if not bool((valid.sum(-1) == lk - pads).all()) or bool((pads >= lk).any()):
            return None
        return pads


def run_rows_without_padding(attention, call: AttentionCall, pads: torch.Tensor) -> torch.Tensor:
    """`attention(call)` computed for each group of rows with equal left padding on those rows'
    real tokens only, as if each row ran alone: positional patterns (windows, sinks, blocks) then
    start at a row's first real token, not at the padded sequence's first slot. Outputs of
    padding queries are zero."""
    out = torch.zeros_like(call.query)
    lq, lk = call.query.shape[-2], call.key.shape[-2]
    for pad in sorted(set(pads.tolist())):
        rows = (pads == pad).nonzero().squeeze(-1)
        first_query = max(0, pad - (lk - lq))  # queries at padded positions are padding themselves
        sub = dataclasses.replace(call, query=call.query[rows, :, first_query:], key=call.key[rows, :, pad:],
                                  value=call.value[rows, :, pad:], mask=_rows_mask(call, rows, first_query, pad))
        out[rows, :, first_query:] = attention(sub)
    return out


def _rows_mask(call: AttentionCall, rows: torch.Tensor, first_query: int, pad: int) -> torch.Tensor | None:
    """The call's mask cut to the rows' real tokens; None where it allows what `causal` alone does."""
    if call.mask is None:
        return None
    mask = call.mask[rows] if call.mask.shape[0] > 1 else call.mask
    mask = mask[..., first_query:, pad:]
    lq, lk = mask.shape[-2], mask.shape[-1]
    plain = torch.ones(lq, lk, dtype=torch.bool, device=mask.device)
    if call.causal:
        plain = plain.tril(diagonal=lk - lq)
    return None if bool((mask == plain).all()) else mask
