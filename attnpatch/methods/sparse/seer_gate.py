"""seer_gate (SeerAttention): a small learned gate picks the key blocks each query block computes.

The gate (ops/seer_gate.py) pools each query block (mean) and key block (max, min, mean), maps
both per head to a gate space and scores key blocks by a softmax of their dot products; the kv
head's query group averages its probabilities. Each query block then computes its local and sink
blocks plus the `top_k` most probable others (as `block_topk`, so the two compare at the same
density), or every block whose probability reaches `threshold`. Training is self-distillation
with the model frozen: under attention transfer each layer's loss is KL(max-pooled attention map
|| gate) over the blocks the gate ranks (one deviation from the paper: the local and sink blocks,
computed anyway, are left out of both, so the gate spends itself on the choice it makes). With gate_dim = head_dim (the default) the gate starts as mean-pooled keys scored by the
mean query, i.e. a block_topk-like heuristic, and learns from there.
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import PatchError
from ...ops.seer_gate import (block_attention_target, fixed_blocks, gate_distillation_loss, gate_log_probs,
                              threshold_layout)
from ...ops.block_selection import block_topk
from ...runtime.exact import exact_attention_weights
from ..base import Paper, ParamSpec
from .base import BACKEND, BLOCK_SIZE, BlockSparseMethod


class SeerGateAttention(BlockSparseMethod):
    name = "seer_gate"
    paper = Paper('SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs', 2024, "https://arxiv.org/abs/2410.13276")
    deviations = ()
    summary = ("SeerAttention: a learned gate (pooled query and key blocks, per-head maps, softmax over key blocks) "
               "picks the key blocks each query block computes; trained by self-distillation against the model's "
               "own max-pooled attention map with the model frozen.")
    interventions = frozenset({"attention", "parameters"})
    trainable = True
    trainable_note = "the gate's per-head query and key-block maps (self-distillation, model frozen)"
    params = (BLOCK_SIZE, BACKEND,
              ParamSpec("gate_dim", int, None, "size of the gate space per head; unset = head_dim (then the gate "
                        "starts as mean-pooled block scoring)", low=1, optional=True),
              ParamSpec("top_k", int, 8, "key blocks chosen per query block by the gate, besides the local and "
                        "sink blocks", low=0),
              ParamSpec("threshold", float, None, "instead of top_k: keep every key block whose gate probability "
                        "(group mean) is at least this", low=0.0, high=1.0, low_open=True, optional=True),
              ParamSpec("local_blocks", int, 1, "nearest key blocks always computed", low=1),
              ParamSpec("sink_blocks", int, 1, "initial key blocks always computed (the attention sink)", low=0))

    def attach(self, module) -> None:
        site = self.site
        d = site.head_dim
        g = self.config["gate_dim"] or d
        weight = site.heads.projections[0] if site.heads is not None else None
        place = {}
        if weight is not None:
            w = getattr(module, weight).weight
            place = {"device": w.device, "dtype": w.dtype}
        if g == d:  # the mean query against the mean key: a block_topk-like start
            query_map = torch.eye(d).expand(site.num_heads, d, d).clone()
            key_map = torch.cat([torch.zeros(2 * d, d), torch.eye(d)]).expand(site.num_kv_heads, 3 * d, d).clone()
        else:
            generator = torch.Generator().manual_seed(site.layer)
            query_map = torch.randn(site.num_heads, d, g, generator=generator) / d ** 0.5
            key_map = torch.randn(site.num_kv_heads, 3 * d, g, generator=generator) / (3 * d) ** 0.5
        module.attnpatch_gate_query = nn.Parameter(query_map.to(**place))
        module.attnpatch_gate_key = nn.Parameter(key_map.to(**place))

    def _fixed(self, call) -> torch.Tensor:
        c = self.config
        return fixed_blocks(call.query.shape[-2], call.key.shape[-2], c["block_size"], call.causal, c["sink_blocks"],
                            c["local_blocks"], call.query.device)

    def _log_probs(self, call) -> torch.Tensor:
        """The gate's distribution over the key blocks it ranks (the admissible ones besides the
        local and sink blocks, which are computed anyway)."""
        m = call.module if call.module is not None else self.site.module
        return gate_log_probs(call.query, call.key, m.attnpatch_gate_query, m.attnpatch_gate_key,
                              self.config["block_size"], call.causal, call.key_valid(), exclude=self._fixed(call))

    def layout(self, call):
        c = self.config
        with torch.no_grad():
            log_probs = self._log_probs(call)
        b, hq, nq, nk = log_probs.shape
        probs = log_probs.exp().view(b, call.key.shape[1], hq // call.key.shape[1], nq, nk).mean(2)
        if c["threshold"] is None:
            return block_topk(call.query, call.key, c["block_size"], causal=call.causal, top_k=c["top_k"],
                              sink_blocks=c["sink_blocks"], local_blocks=c["local_blocks"], valid=call.key_valid(),
                              scores=probs.masked_fill(probs <= 0, float("-inf")))
        return threshold_layout(probs, call.query.shape[-2], call.key.shape[-2], c["block_size"], causal=call.causal,
                                threshold=c["threshold"], sink_blocks=c["sink_blocks"],
                                local_blocks=c["local_blocks"], valid=call.key_valid())

    def transfer_loss(self, call) -> torch.Tensor:
        if call.query.shape[-2] <= 1:
            raise PatchError("seer_gate learns from prefill blocks; attention transfer got a single query")
        with torch.no_grad():
            target = block_attention_target(exact_attention_weights(call), self.config["block_size"], call.causal,
                                            exclude=self._fixed(call))
        self.calls += 1
        return gate_distillation_loss(self._log_probs(call), target)
