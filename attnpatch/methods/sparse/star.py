"""star: Star Attention's context chunks with an anchor, and global final queries."""

from __future__ import annotations

from ...ops.sparse_patterns import star
from ..base import ParamSpec
from .base import BACKEND, BLOCK_SIZE, BlockSparseMethod


class StarAttention(BlockSparseMethod):
    name = "star"
    summary = ("Star Attention: context blocks each attend themselves and the anchor (the first blocks); the "
               "final `query_tokens` positions attend everything (the global phase).")
    params = (BLOCK_SIZE, BACKEND,
              ParamSpec("context_blocks", int, 16, "blocks per context chunk", low=1),
              ParamSpec("anchor_blocks", int, 16, "first blocks every chunk also attends", low=0),
              ParamSpec("query_tokens", int, 64, "final positions with global attention", low=0))

    def layout(self, call):
        c = self.config
        return star(call.query.shape[-2], call.key.shape[-2], c["block_size"], causal=call.causal,
                    context_blocks=c["context_blocks"], anchor_blocks=c["anchor_blocks"],
                    query_tokens=c["query_tokens"], device=call.query.device)
