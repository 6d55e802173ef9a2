"""TOVA: keep what the newest query attends to most."""

from __future__ import annotations

from .base import KVCompressionMethod


class TOVA(KVCompressionMethod):
    name = "tova"
    summary = ("TOVA: keep the entries the current (last) query attends to most, averaged over the layer's heads "
               "(one choice per layer, as in the paper); re-scored at every step.")

    def observed_queries(self):
        return 1

    def score(self, keys, attention, valid):  # the mean over heads: every head keeps the same tokens
        return attention.mean(dim=1, keepdim=True).expand_as(attention)
