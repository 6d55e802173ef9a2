"""star: Star Attention's context chunks with an anchor, and global final queries."""

from __future__ import annotations

from ...ops.sparse_patterns import star
from ..base import Paper, ParamSpec
from .base import BACKEND, BLOCK_SIZE, BlockSparseMethod


class StarAttention(BlockSparseMethod):
    name = "star"
    paper = Paper('Star Attention: Efficient LLM Inference over Long Sequences', 2024, "https://arxiv.org/abs/2411.17116")
    deviations = (
        "the global phase attends with the last `query_tokens` positions (default 64), not with the question's own tokens (issue 41)",
    )
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
