"""a_shape: sinks + a local window, at block granularity (MInference's A-shape)."""

from __future__ import annotations

from ...ops.sliding import a_shape_prefill
from ...ops.sparse_patterns import a_shape
from ..base import Paper, ParamSpec
from .base import BACKEND, BLOCK_SIZE, BlockSparseMethod


class AShapeAttention(BlockSparseMethod):
    name = "a_shape"
    paper = Paper('MInference 1.0: Accelerating Pre-filling for Long-Context LLMs via Dynamic Sparse Attention', 2024, "https://arxiv.org/abs/2407.02490")
    deviations = ()
    summary = ("Sinks + local window at block granularity (MInference's A-shape): each query block computes the "
               "first `sink_blocks` key blocks and its `local_blocks` nearest ones, nothing else.")
    params = (BLOCK_SIZE, BACKEND,
              ParamSpec("sink_blocks", int, 1, "initial key blocks every query block computes", low=0),
              ParamSpec("local_blocks", int, 4, "nearest key blocks (the diagonal included)", low=1))

    def layout(self, call):
        return self.layout_for(call.query.shape[-2], call.key.shape[-2], call.causal, call.query.device)

    def layout_for(self, lq: int, lk: int, causal: bool, device=None):
        c = self.config
        return a_shape(lq, lk, c["block_size"], causal=causal, sink_blocks=c["sink_blocks"],
                       local_blocks=c["local_blocks"], device=device)

    def attention(self, call):
        c = self.config
        if (self.skips_blocks(call) and call.causal and call.mask is None and call.softcap is None
                and call.query.shape[-2] == call.key.shape[-2] and c["backend"] != "flex"):
            # a plain causal prefill: the sliding window's overlapping key spans, no gathered key blocks;
            # `auto` takes it on a GPU too, where it measured faster than FlexAttention (H200, bf16,
            # SmolLM2: 0.064 / 0.093 / 0.278 s against 0.102 / 0.128 / 0.353 s at 8k / 32k / 128k)
            lq, lk = call.query.shape[-2], call.key.shape[-2]
            self._density_of_last_call = lambda: self.layout_for(lq, lk, True).density(lk, True)
            self.last_backend = "torch"
            return a_shape_prefill(call.query, call.key, call.value, sink_blocks=c["sink_blocks"],
                                   local_blocks=c["local_blocks"], block=c["block_size"], scaling=call.scaling)
        return super().attention(call)
