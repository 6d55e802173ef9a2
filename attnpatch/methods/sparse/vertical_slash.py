"""vertical_slash: MInference's vertical columns and diagonal slashes, picked by the last queries."""

from __future__ import annotations

from ...ops.sparse_patterns import vertical_slash
from ..base import Paper, ParamSpec
from .base import BACKEND, BLOCK_SIZE, BlockSparseMethod


class VerticalSlashAttention(BlockSparseMethod):
    name = "vertical_slash"
    paper = Paper('MInference 1.0: Accelerating Pre-filling for Long-Context LLMs via Dynamic Sparse Attention', 2024, "https://arxiv.org/abs/2407.02490")
    deviations = ()
    model_kinds = ("decoder",)
    summary = ("MInference's vertical-slash pattern: the last `last_q` queries' attention picks per kv head the "
               "`vertical` most attended key columns and the `slash` most attended diagonals; columns are computed "
               "as single keys, diagonals as the blocks their band crosses.")
    extra_keys = True
    params = (BLOCK_SIZE, BACKEND,
              ParamSpec("vertical", int, 256, "key columns kept per kv head", low=0),
              ParamSpec("slash", int, 8, "diagonals kept per kv head (the main one always)", low=1),
              ParamSpec("last_q", int, 64, "newest queries used to estimate the pattern", low=1))

    def layout(self, call):
        c = self.config
        return vertical_slash(call.query, call.key, c["block_size"], scaling=call.scaling, last_q=c["last_q"],
                              vertical=c["vertical"], slash=c["slash"], valid=call.key_valid())
