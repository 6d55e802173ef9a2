"""Normalising what a model library passes to its attention into the `AttentionCall` methods read."""

from __future__ import annotations

import torch


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
