"""TOVA: keep what the newest query attends to most."""

from __future__ import annotations

from .base import KVCompressionMethod


class TOVA(KVCompressionMethod):
    name = "tova"
    summary = "TOVA: keep the entries the current (last) query attends to most; re-scored at every step."

    def observed_queries(self):
        return 1

    def score(self, keys, attention, valid):
        return attention
