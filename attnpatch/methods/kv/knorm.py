"""Knorm: evict the keys with the largest norm; no attention needed."""

from __future__ import annotations

from .base import KVCompressionMethod


class KNorm(KVCompressionMethod):
    name = "knorm"
    summary = "Knorm: evict the keys with the largest L2 norm (score = -||k||); no attention weights needed."

    def score(self, keys, attention, valid):
        return -keys.float().norm(dim=-1)
