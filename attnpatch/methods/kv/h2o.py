"""H2O: heavy hitters (attention accumulated over every query so far) plus recent tokens."""

from __future__ import annotations

from ..base import Paper, ParamSpec
from .base import KVCompressionMethod


class H2O(KVCompressionMethod):
    name = "h2o"
    paper = Paper('H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models', 2023, "https://arxiv.org/abs/2306.14048")
    deviations = ()
    summary = ("H2O: keep heavy hitters (largest attention accumulated over every query so far) plus the most "
               "recent tokens; scores keep accumulating while decoding.")
    params = KVCompressionMethod.params + (
        ParamSpec("recent_ratio", float, 0.5, "share of the budget reserved for the newest tokens", low=0.0, high=1.0),
    )
    accumulates = True

    def observed_queries(self):
        return None  # every query

    def recent(self, budget):
        return (budget * self.config["recent_ratio"]).long()

    def score(self, keys, attention, valid):
        return attention
