"""SnapKV: score the prompt by the attention of its last queries, pooled; compress once."""

from __future__ import annotations

from ...ops.kv_select import pool_scores
from ..base import ParamSpec
from .base import KVCompressionMethod


class SnapKV(KVCompressionMethod):
    name = "snapkv"
    summary = ("SnapKV: after prefill, score prompt keys by the attention of the last `window` queries, pool the "
               "scores, keep the top entries per kv head plus the window; the cache then grows while decoding.")
    evict_while_decoding = False
    params = KVCompressionMethod.params + (
        ParamSpec("window", int, 32, "observation window: last prompt queries whose attention scores keys", low=1),
        ParamSpec("kernel", int, 7, "pooling kernel over the sequence (1 = none)", low=1),
        ParamSpec("pooling", str, "avg", "pooling of the scores", choices=("avg", "max")),
    )

    def observed_queries(self):
        return self.config["window"]

    def recent(self, budget):
        return self.config["window"]

    def score(self, keys, attention, valid):
        return pool_scores(attention, self.config["kernel"], self.config["pooling"], valid)
