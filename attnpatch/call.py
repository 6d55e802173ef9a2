"""The normalised attention call every method receives, whatever library the model comes from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

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


def normalise_mask(mask: torch.Tensor | None, key_length: int) -> torch.Tensor | None:
    """Any transformers / diffusers mask -> boolean (True = attend) over the last `key_length` keys.

    Float masks are additive (0 keep, large negative drop: transformers uses the dtype's minimum,
    diffusers -10000); a mask wider than the keys describes
    positions a state-keeping cache has already absorbed, so only its last columns apply.
    """
    if mask is None:
        return None
    if mask.dtype != torch.bool:
        mask = mask > -1.0
    if mask.dim() == 2:  # (Lq, Lk)
        mask = mask[None, None]
    elif mask.dim() == 3:  # (B, Lq, Lk)
        mask = mask[:, None]
    if mask.shape[-1] > key_length:
        mask = mask[..., -key_length:]
    return mask
