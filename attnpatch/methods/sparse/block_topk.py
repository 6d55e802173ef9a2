"""block_topk: training-free query-aware block selection (Quest / MoBA style)."""

from __future__ import annotations

import torch

from ...ops.block_selection import block_topk, block_topk_recall
from ...runtime.exact import exact_attention
from ..base import Paper, ParamSpec
from .base import BACKEND, BLOCK_SIZE, BlockSparseMethod


class BlockTopKAttention(BlockSparseMethod):
    name = "block_topk"
    paper = Paper('Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference; MoBA: Mixture of Block Attention for Long-Context LLMs', 2024, "https://arxiv.org/abs/2406.10774")
    deviations = (
        'sparse in prefill only: a one-token decoding step attends the whole cache, where Quest reads only the pages it selects (issue 41)',
    )
    summary = ("Training-free block top-k (Quest / MoBA style): key blocks are scored by every query of a query "
               "block against pooled keys (mean, or Quest's max/min bound), and each query block computes its "
               "`top_k` best blocks plus its local block(s). Per-kv-head budgets with `head_top_k`.")
    params = (BLOCK_SIZE, BACKEND,
              ParamSpec("top_k", int, 8, "key blocks chosen per query block, besides the local and sink blocks", low=0),
              ParamSpec("pooling", str, "mean", "key-block summary used for scoring", choices=("mean", "maxmin")),
              ParamSpec("query_pooling", str, "max", "'max': every query scores the key blocks and a block counts as "
                        "much as its most interested query; 'mean': the query block's mean query scores them "
                        "(MInference's estimate, block_size times cheaper)", choices=("max", "mean")),
              ParamSpec("local_blocks", int, 1, "nearest key blocks always computed", low=1),
              ParamSpec("sink_blocks", int, 1, "initial key blocks always computed (the attention sink)", low=0),
              ParamSpec("head_top_k", list, None, "per-kv-head top_k (overrides top_k)", low=0, optional=True))

    recorder = None  # set by calibration.calibrate_block_topk: measure recall, attend exactly

    def attention(self, call):
        if self.recorder is not None and self.skips_blocks(call):
            c = self.config
            self.recorder.add(*block_topk_recall(
                call.query, call.key, c["block_size"], causal=call.causal, scaling=call.scaling, pooling=c["pooling"],
                query_pooling=c["query_pooling"], sink_blocks=c["sink_blocks"], local_blocks=c["local_blocks"],
                mask=call.mask, valid=call.key_valid(), softcap=call.softcap))
            return exact_attention(call)
        return super().attention(call)

    def layout(self, call):
        c = self.config
        budgets = c["top_k"] if c["head_top_k"] is None else torch.tensor(c["head_top_k"])
        return block_topk(call.query, call.key, c["block_size"], causal=call.causal, top_k=budgets,
                          pooling=c["pooling"], query_pooling=c["query_pooling"], sink_blocks=c["sink_blocks"],
                          local_blocks=c["local_blocks"], valid=call.key_valid())
