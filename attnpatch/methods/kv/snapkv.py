"""SnapKV: score the prompt by the attention of its last queries, pooled; compress once."""

from __future__ import annotations

from ...ops.kv_select import pool_scores
from ...ops.token_ranks import valid_rank
from ..base import Paper, ParamSpec
from .base import KVCompressionMethod, decode_param


class SnapKV(KVCompressionMethod):
    name = "snapkv"
    paper = Paper('SnapKV: LLM Knows What You are Looking for Before Generation', 2024, "https://arxiv.org/abs/2404.14469")
    deviations = ()
    summary = ("SnapKV: after prefill, score prompt keys by the attention of the last `window` queries, pool the "
               "scores, keep the top entries per kv head plus the window; the cache then grows while decoding.")
    params = KVCompressionMethod.params[:-1] + (decode_param("grow"),) + (
        ParamSpec("window", int, 32, "observation window: last prompt queries whose attention scores keys", low=1),
        ParamSpec("kernel", int, 7, "pooling kernel over the sequence (1 = none)", low=1),
        ParamSpec("pooling", str, "avg", "pooling of the scores", choices=("avg", "max")),
    )

    def observed_queries(self):
        return self.config["window"]

    def recent(self, budget):
        return self.config["window"]

    def score(self, keys, attention, valid):
        # pool the prefix only: the observation window is kept anyway (recent), and its own high
        # self-attention must not leak into the scores of the prefix entries next to it
        newest_rank = valid.sum(-1, keepdim=True) - 1 - valid_rank(valid)
        prefix = valid & (newest_rank >= self.config["window"])
        return pool_scores(attention, self.config["kernel"], self.config["pooling"], prefix)
