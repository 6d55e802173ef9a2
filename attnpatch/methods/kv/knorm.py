"""Knorm: evict the keys with the largest norm; no attention needed."""

from __future__ import annotations

from ..base import Paper
from .base import KVCompressionMethod, decode_param


class KNorm(KVCompressionMethod):
    name = "knorm"
    paper = Paper('A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression', 2024, "https://arxiv.org/abs/2406.11430")
    deviations = (
        "compresses the prompt once and keeps every decoded token by default (decode='grow'): new keys have large norms and would evict each other",
    )
    summary = ("Knorm: evict the keys with the largest L2 norm (score = -||k||); no attention weights needed. "
               "Compresses the prompt once by default (new keys have large norms and would evict each other).")
    params = KVCompressionMethod.params[:-1] + (decode_param("grow"),)

    def score(self, keys, attention, valid):
        return -keys.float().norm(dim=-1)
