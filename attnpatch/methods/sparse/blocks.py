"""Sparse attention methods. Block-sparse ones build a `BlockLayout` for the call and compute only the
key blocks it keeps (ops/block_sparse.py): prefill (and any multi-token call) is sparse; a single
decoding query attends its whole dense cache, exactly, so generation stays correct. Grid methods
(window_2d, agent) see ViT/DiT tokens as a 2-D patch grid (ops/grid2d.py)."""

from __future__ import annotations

import math

import torch

from ...errors import PatchError
from ...ops.block_sparse import block_sparse_attention
from ...ops.grid2d import PatchGrid, agent_attention, neighbourhood_tiles, pool_agents, window_2d_attention
from ...ops.sparse_patterns import a_shape, bigbird, block_topk, block_topk_recall, star, vertical_slash
from ..base import Method, ParamSpec
from ...runtime.exact import exact_attention

_BLOCK = ParamSpec("block_size", int, 64, "tokens per query and key block", low=1, high=8192)


class BlockSparseMethod(Method):
    family = "sparse"
    params = (_BLOCK,)
    last_density: float | None = None  # computed / dense key blocks of the latest sparse call

    def layout(self, call):
        raise NotImplementedError

    def skips_blocks(self, call) -> bool:
        """False for a decoding step or a single key block: nothing to skip."""
        return call.query.shape[-2] > 1 and call.key.shape[-2] > self.config["block_size"]

    def needs_unpadded_rows(self, call) -> bool:  # blocks start at a row's first real token
        return self.skips_blocks(call)

    def attention(self, call):
        lk = call.key.shape[-2]
        if not self.skips_blocks(call):
            return exact_attention(call)
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


class BlockTopKAttention(BlockSparseMethod):
    name = "block_topk"
    summary = ("Training-free block top-k (Quest / MoBA style): key blocks are scored by every query of a query "
               "block against pooled keys (mean, or Quest's max/min bound), and each query block computes its "
               "`top_k` best blocks plus its local block(s). Per-kv-head budgets with `head_top_k`.")
    params = (_BLOCK,
              ParamSpec("top_k", int, 8, "key blocks chosen per query block, besides the local and sink blocks", low=0),
              ParamSpec("pooling", str, "mean", "key-block summary used for scoring", choices=("mean", "maxmin")),
              ParamSpec("local_blocks", int, 1, "nearest key blocks always computed", low=1),
              ParamSpec("sink_blocks", int, 1, "initial key blocks always computed (the attention sink)", low=0),
              ParamSpec("head_top_k", list, None, "per-kv-head top_k (overrides top_k)", low=0, optional=True))

    recorder = None  # set by calibration.calibrate_block_topk: measure recall, attend exactly

    def attention(self, call):
        if self.recorder is not None and self.skips_blocks(call):
            c = self.config
            self.recorder.add(*block_topk_recall(
                call.query, call.key, c["block_size"], causal=call.causal, scaling=call.scaling, pooling=c["pooling"],
                sink_blocks=c["sink_blocks"], local_blocks=c["local_blocks"], mask=call.mask, valid=call.key_valid(),
                softcap=call.softcap))
            return exact_attention(call)
        return super().attention(call)

    def layout(self, call):
        c = self.config
        budgets = c["top_k"] if c["head_top_k"] is None else torch.tensor(c["head_top_k"])
        return block_topk(call.query, call.key, c["block_size"], causal=call.causal, top_k=budgets,
                          pooling=c["pooling"], sink_blocks=c["sink_blocks"], local_blocks=c["local_blocks"],
                          valid=call.key_valid())


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


class GridMethod(Method):
    """Base of the methods that see the tokens as a 2-D patch grid (ViT, CLIP vision, DiT). Self-
    attention only: cross-attention (DiT text conditioning) stays exact."""

    family = "sparse"
    model_kinds = ("encoder", "diffusion")
    grid_params = (
        ParamSpec("grid", list, None, "[height, width] of the patch grid (default: the largest square that fits "
                  "the sequence, the rest being global tokens)", low=1, optional=True),
        ParamSpec("globals_at", str, "auto", "where the global tokens (CLS, registers, a joint model's text) sit: "
                  "'start', 'end', or 'auto' (start for ViT/CLIP, end for diffusers models, whose joint "
                  "attention appends the text)", choices=("auto", "start", "end")),
    )

    def patch_grid(self, call) -> PatchGrid:
        at = self.config["globals_at"]
        first = self.site.kind != "diffusion" if at == "auto" else at == "start"
        return PatchGrid.infer(call.query.shape[-2], self.config["grid"], first)

    def attention(self, call):
        # text towers (causal) and cross-attention have no patch grid: they stay exact
        if call.causal or self.site.cross or call.query.shape[-2] != call.key.shape[-2]:
            return exact_attention(call)
        return self.grid_attention(call, self.patch_grid(call))

    def grid_attention(self, call, patch_grid: PatchGrid):
        raise NotImplementedError

    def check_site(self, site) -> None:
        if self.config.get("grid") is not None and len(self.config["grid"]) != 2:
            raise PatchError(f"{self.name}: grid must be [height, width] in patches, got {self.config['grid']}")


class Window2DAttention(GridMethod):
    name = "window_2d"
    summary = ("2-D neighbourhood window for ViT/DiT: patches grouped in tile x tile tiles; each tile attends the "
               "window_tiles x window_tiles tiles around it (shifted inward at borders) and the global tokens, "
               "which attend everything. Computed block-sparse: only the kept tiles.")
    params = (ParamSpec("tile", int, 4, "side of a tile in patches (queries of a tile share one window)", low=1,
                        high=64),
              ParamSpec("window_tiles", int, 3, "side of the neighbourhood in tiles", low=1),
              *GridMethod.grid_params)
    last_density: float | None = None  # computed / dense query-key pairs among patches, latest call

    def grid_attention(self, call, patch_grid):
        c = self.config
        tiles = neighbourhood_tiles(math.ceil(patch_grid.height / c["tile"]), math.ceil(patch_grid.width / c["tile"]),
                                    c["window_tiles"])
        self.last_density = float(tiles.float().mean())
        return window_2d_attention(call.query, call.key, call.value, patch_grid, tile=c["tile"],
                                   window_tiles=c["window_tiles"], scaling=call.scaling, mask=call.mask,
                                   softcap=call.softcap)


class AgentAttention(GridMethod):
    name = "agent"
    summary = ("Agent attention for ViT/DiT: agent tokens (the patch queries average-pooled to an "
               "agent_grid x agent_grid grid) attend all keys, then every query attends the agents: "
               "O(L * agents) instead of O(L^2). Training-free it approximates; recipes can fine-tune after.")
    params = (ParamSpec("agent_grid", int, 7, "side of the agent grid (agent_grid^2 agent tokens)", low=1),
              *GridMethod.grid_params)

    def grid_attention(self, call, patch_grid):
        if call.softcap is not None:
            raise PatchError("agent attention has no softcapped form; use window_2d or a dense method here")
        agents = pool_agents(call.query, patch_grid, min(self.config["agent_grid"], patch_grid.height,
                                                         patch_grid.width))
        return agent_attention(call.query, call.key, call.value, agents, scaling=call.scaling,
                               key_valid=call.key_valid())
