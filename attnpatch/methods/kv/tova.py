"""TOVA: keep what the newest query attends to most."""

from __future__ import annotations

from ..base import Paper
from .base import KVCompressionMethod


class TOVA(KVCompressionMethod):
    name = "tova"
    paper = Paper('Transformers are Multi-State RNNs (TOVA)', 2024, "https://arxiv.org/abs/2401.06104")
    deviations = ()
    summary = ("TOVA: keep the entries the current (last) query attends to most, averaged over the layer's heads "
               "(one choice per layer, as in the paper); re-scored at every step.")

    def observed_queries(self):
        return 1

    def score(self, keys, attention, valid):  # the mean over heads: every head keeps the same tokens
        return attention.mean(dim=1, keepdim=True).expand_as(attention)
