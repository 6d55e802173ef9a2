"""Block-sparse attention methods: each builds a `BlockLayout` for the call and computes only the
key blocks it keeps (ops/block_sparse.py). Prefill (and any multi-token call) is sparse; a single
decoding query attends its whole dense cache, exactly, so generation stays correct."""

from __future__ import annotations

import torch

from ..errors import PatchError
from ..ops.block_sparse import block_sparse_attention
from ..ops.sparse_patterns import a_shape, bigbird, block_topk, star, vertical_slash
from ..registry import Method, ParamSpec, register_method
from .reference import exact_attention

_BLOCK = ParamSpec("block_size", int, 64, "tokens per query and key block", low=1, high=8192)


class BlockSparseMethod(Method):
    family = "sparse"
    params = (_BLOCK,)
    last_density: float | None = None  # computed / dense key blocks of the latest sparse call

    def layout(self, call):
        raise NotImplementedError

    def attention(self, call):
        lq, lk = call.query.shape[-2], call.key.shape[-2]
        if lq == 1 or lk <= self.config["block_size"]:
            return exact_attention(call)  # decoding step or a single block: nothing to skip
        layout = self.layout(call)
        self.last_density = layout.density(lk, call.causal)  # for benchmarks: fraction of blocks computed
        return block_sparse_attention(call.query, call.key, call.value, layout, call.mask,
                                      causal=call.causal, scaling=call.scaling, softcap=call.softcap)

    def check_site(self, site) -> None:  # per-kv-head list parameters must match the layer
        for spec in self.params:
            if spec.kind is list and self.config.get(spec.name) is not None:
                if len(self.config[spec.name]) != site.num_kv_heads:
                    raise PatchError(f"{self.name}: {spec.name} has {len(self.config[spec.name])} entries but "
                                     f"{site.path} has {site.num_kv_heads} kv heads; give one value per kv head")


@register_method
class AShapeAttention(BlockSparseMethod):
    name = "a_shape"
    summary = ("Sinks + local window at block granularity (MInference's A-shape): each query block computes the "
               "first `sink_blocks` key blocks and its `local_blocks` nearest ones, nothing else.")
    params = (_BLOCK,
              ParamSpec("sink_blocks", int, 1, "initial key blocks every query block computes", low=0),
              ParamSpec("local_blocks", int, 4, "nearest key blocks (the diagonal included)", low=1))

    def layout(self, call):
        c = self.config
        return a_shape(call.query.shape[-2], call.key.shape[-2], c["block_size"], causal=call.causal,
                       sink_blocks=c["sink_blocks"], local_blocks=c["local_blocks"], device=call.query.device)


@register_method
class BlockTopKAttention(BlockSparseMethod):
    name = "block_topk"
    summary = ("Training-free block top-k (Quest / MoBA style): key blocks are scored by every query of a query "
               "block against pooled keys (mean, or Quest's max/min bound), and each query block computes its "
               "`top_k` best blocks plus its local block(s). Per-kv-head budgets with `head_top_k`.")
    params = (_BLOCK,
              ParamSpec("top_k", int, 8, "key blocks chosen per query block, besides the local and sink blocks", low=0),
              ParamSpec("pooling", str, "mean", "key-block summary used for scoring", choices=("mean", "maxmin")),
              ParamSpec("local_blocks", int, 1, "nearest key blocks always computed", low=1),
              ParamSpec("sink_blocks", int, 0, "initial key blocks always computed", low=0),
              ParamSpec("head_top_k", list, None, "per-kv-head top_k (overrides top_k)", low=0, optional=True))

    def layout(self, call):
        c = self.config
        budgets = c["top_k"] if c["head_top_k"] is None else torch.tensor(c["head_top_k"])
        return block_topk(call.query, call.key, c["block_size"], causal=call.causal, top_k=budgets,
                          pooling=c["pooling"], sink_blocks=c["sink_blocks"], local_blocks=c["local_blocks"],
                          valid=call.key_valid())


@register_method
class BigBirdAttention(BlockSparseMethod):
    name = "bigbird"
    summary = ("BigBird: a window of key blocks, global blocks (the first ones, as keys and as queries) and random "
               "blocks per query block and kv head, drawn from a seed (fixed per layer).")
    params = (_BLOCK,
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


@register_method
class StarAttention(BlockSparseMethod):
    name = "star"
    summary = ("Star Attention: context blocks each attend themselves and the anchor (the first blocks); the "
               "final `query_tokens` positions attend everything (the global phase).")
    params = (_BLOCK,
              ParamSpec("context_blocks", int, 16, "blocks per context chunk", low=1),
              ParamSpec("anchor_blocks", int, 16, "first blocks every chunk also attends", low=0),
              ParamSpec("query_tokens", int, 64, "final positions with global attention", low=0))

    def layout(self, call):
        c = self.config
        return star(call.query.shape[-2], call.key.shape[-2], c["block_size"], causal=call.causal,
                    context_blocks=c["context_blocks"], anchor_blocks=c["anchor_blocks"],
                    query_tokens=c["query_tokens"], device=call.query.device)


@register_method
class VerticalSlashAttention(BlockSparseMethod):
    name = "vertical_slash"
    model_kinds = ("decoder",)
    summary = ("MInference's vertical-slash pattern: the last `last_q` queries' attention picks per kv head the "
               "`vertical` most attended key columns and the `slash` most attended diagonals; columns are computed "
               "as single keys, diagonals as the blocks their band crosses.")
    params = (_BLOCK,
              ParamSpec("vertical", int, 256, "key columns kept per kv head", low=0),
              ParamSpec("slash", int, 8, "diagonals kept per kv head (the main one always)", low=1),
              ParamSpec("last_q", int, 64, "newest queries used to estimate the pattern", low=1))

    def layout(self, call):
        c = self.config
        return vertical_slash(call.query, call.key, c["block_size"], scaling=call.scaling, last_q=c["last_q"],
                              vertical=c["vertical"], slash=c["slash"], valid=call.key_valid())
