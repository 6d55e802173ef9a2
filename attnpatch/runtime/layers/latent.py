"""The cache layer of `mla`: each token's keys and values stored as a low-rank latent."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer


class LatentKVLayer(DynamicLayer):
    """Keeps, per token, the latent `compress(keys, values)` gives instead of the keys and values:
    `keys` (B, 1, L, key latent dims) and `values` (B, 1, L, value latent dims). `update` stores the
    new tokens' latents and returns every token's keys and values rebuilt by `expand`, so the
    model's masks and attention apply unchanged. Being a DynamicLayer of (B, 1, L, d) tensors,
    length, cropping, beam reordering and batch edits work as they do on dense entries, and the
    bytes held are those of the latents."""

    def __init__(self, compress, expand, **kwargs):
        super().__init__(**kwargs)
        self.compress, self.expand = compress, expand

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        latent_keys, latent_values = super().update(*self.compress(key_states, value_states))
        return self.expand(latent_keys, latent_values)
