"""bigbird: window, global and seeded random blocks."""

from __future__ import annotations

from ...ops.sparse_patterns import bigbird
from ..base import Paper, ParamSpec
from .base import BACKEND, BLOCK_SIZE, BlockSparseMethod


class BigBirdAttention(BlockSparseMethod):
    name = "bigbird"
    paper = Paper('Big Bird: Transformers for Longer Sequences', 2020, "https://arxiv.org/abs/2007.14062")
    deviations = ()
    summary = ("BigBird: a window of key blocks, global blocks (the first ones, as keys and as queries) and random "
               "blocks per query block and kv head, drawn from a seed (fixed per layer).")
    params = (BLOCK_SIZE, BACKEND,
              ParamSpec("window_blocks", int, 1, "key blocks on each side of the diagonal (causal: before it)", low=0),
              ParamSpec("global_blocks", int, 1, "first blocks that attend and are attended everywhere", low=0),
              ParamSpec("random_blocks", int, 2, "random key blocks per query block", low=0),
              ParamSpec("seed", int, 0, "random-block seed (the layer index is added)", low=0))

    def layout(self, call):
        c = self.config
        return bigbird(call.query.shape[-2], call.key.shape[-2], c["block_size"], causal=call.causal,
                       window_blocks=c["window_blocks"], global_blocks=c["global_blocks"],
                       random_blocks=c["random_blocks"], heads=call.key.shape[1], seed=c["seed"] + self.site.layer,
                       device=call.query.device)
