"""KV-cache compression: StreamingLLM, H2O, SnapKV, PyramidKV, TOVA, Knorm.

Every method keeps, per sequence and per kv head, a budget of cache entries in a
`CompressedKVLayer`; what is evicted is freed. Budget: `budget` tokens, or else
ceil((1 - compression) x real prompt tokens) per sequence (padding never counts). Policies:

- prefill: attention over the whole prompt is exact (streaming: sinks + window, as the model will
  see it from then on); then the cache is cut to the budget by the method's score.
- decoding: streaming, h2o, tova and knorm hold the cache at the budget, evicting one entry per
  new token; snapkv and pyramidkv compress once after prefill and then let the cache grow, as
  in their papers.

Selection is per kv head with the score summed over the head's query group (GQA), and per
sequence (left padding: padded slots are never kept as real entries).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..runtime.layers import CompressedKVLayer, QuantizedKVLayer
from ..errors import PatchError
from ..ops.kv_select import (
    accumulated_attention_scores,
    attention_weights,
    block_mask,
    pool_scores,
    select_indices,
    valid_rank,
    window_attention_scores,
    _grouped_sum,
)
from ..runtime.exact import exact_attention, sdpa_attention as _sdpa
from ..ops.sliding import sliding_window_attention
from .base import Method, ParamSpec

BUDGET_PARAMS = (
    ParamSpec("compression", float, 0.5, "fraction of the prompt's cache entries evicted", low=0.0, high=1.0,
              high_open=True),
    ParamSpec("budget", int, None, "cache entries kept per sequence and kv head (overrides compression)",
              low=1, optional=True),
)


class KVCompressionMethod(Method):
    family = "kv-compressed"
    model_kinds = ("decoder",)
    interventions = frozenset({"attention", "cache"})
    cache_layer_class = CompressedKVLayer
    evict_while_decoding: ClassVar[bool] = True
    params = BUDGET_PARAMS + (ParamSpec("sinks", int, 0, "first tokens always kept", low=0),)

    # --- what a method defines
    def prefill_scores(self, call, layer: CompressedKVLayer) -> torch.Tensor:
        raise NotImplementedError

    def decode_scores(self, call, layer: CompressedKVLayer) -> torch.Tensor:
        return self.prefill_scores(call, layer)

    def recent(self, budget: torch.Tensor) -> torch.Tensor | int:
        """Newest entries always kept: an int, or (B,) per sequence from its own budget (a padded
        sequence keeps what it would keep alone)."""
        return 0

    def layer_budget(self, real_tokens: torch.Tensor) -> torch.Tensor:
        if self.config["budget"] is not None:
            return torch.full_like(real_tokens, self.config["budget"])
        return torch.clamp(torch.ceil(real_tokens * (1.0 - self.config["compression"])).long(), min=1)

    # --- shared machinery
    def attention(self, call):
        layer = self.required_cache_layer(call)
        if layer is None:  # the model runs without a cache (warned): nothing to compress
            return exact_attention(call)
        lq = call.query.shape[-2]
        if call.mask is not None:  # padding of the new tokens, from the model's mask
            new_valid = call.mask[..., -lq:].any(dim=-2).any(dim=1)  # (B or 1, lq)
            layer.valid[..., -lq:] &= new_valid[:, None, :]
        prefill = layer.budget is None
        out = self.compute_output(call, layer, prefill)
        if prefill:
            layer.budget = self.layer_budget(layer.valid[:, 0].sum(-1))
            scores = self.prefill_scores(call, layer)
        elif self.evict_while_decoding:
            scores = self.decode_scores(call, layer)
        else:  # compress-once methods: the cache grows, except what a sliding window drops
            layer.budget = layer.budget + lq
            if layer.sliding_window is None:
                return out
            scores = torch.zeros_like(layer.valid, dtype=torch.float32)
        if layer.sliding_window is not None:  # entries the model's own window no longer reaches
            newest = layer.seen_tokens - 1
            layer.valid &= (newest - layer.positions) < layer.sliding_window - 1
        over = bool((layer.valid[:, 0].sum(-1) > layer.budget).any())
        if over or layer.stored_tokens > int(layer.budget.max()):
            index, valid = select_indices(scores, layer.valid, layer.budget, sinks=self.config["sinks"],
                                          recent=self.recent(layer.budget))
            layer.keep(index, valid)
        return out

    def compute_output(self, call, layer: CompressedKVLayer, prefill: bool) -> torch.Tensor:
        lq, length = call.query.shape[-2], call.key.shape[-2]
        window = layer.sliding_window
        if prefill and lq == length and bool(layer.valid.all()) and (window is None or length <= window):
            return _sdpa(call, None, True)
        return _sdpa(call, self.allowed(call, layer, prefill), False)

    def allowed(self, call, layer: CompressedKVLayer, prefill: bool) -> torch.Tensor:
        """(B, 1 or Hq, Lq, L) boolean: valid, causal, and inside the model's own sliding window."""
        lq, length = call.query.shape[-2], call.key.shape[-2]
        valid = layer.valid[:, :1] if prefill else layer.valid  # identical heads until the first eviction
        allowed = block_mask(valid, torch.arange(length - lq, length, device=call.query.device), length,
                             call.query.shape[1])
        if layer.sliding_window is not None:
            positions = layer.positions[:, : allowed.shape[1] if prefill else None].long()
            distance = positions[:, :, -lq:, None] - positions[:, :, None, :]  # new entries are last, in order
            in_window = distance < layer.sliding_window
            if in_window.shape[1] != allowed.shape[1]:
                in_window = in_window.repeat_interleave(allowed.shape[1] // in_window.shape[1], dim=1)
            allowed = allowed & in_window
        return allowed


class StreamingLLM(KVCompressionMethod):
    name = "streaming"
    summary = ("StreamingLLM: keep the first `sinks` tokens and the most recent ones (budget - sinks), during "
               "prefill (attention itself is sinks + window) and decoding.")
    params = BUDGET_PARAMS + (ParamSpec("sinks", int, 4, "attention-sink tokens always kept", low=0),)

    @classmethod
    def check_params(cls, params):
        if params["budget"] is not None and params["budget"] <= params["sinks"]:
            raise PatchError(f"method 'streaming' needs budget > sinks, got budget={params['budget']}, "
                             f"sinks={params['sinks']}")

    def recent(self, budget):
        return (budget - self.config["sinks"]).clamp(min=1)

    def prefill_scores(self, call, layer):
        return torch.zeros_like(layer.valid, dtype=torch.float32)

    def compute_output(self, call, layer, prefill):
        if not prefill:
            return super().compute_output(call, layer, prefill)
        budgets = self.layer_budget(layer.valid[:, 0].sum(-1))  # (B,): each sequence's own window
        sinks = self.config["sinks"]
        window = int(budgets.max()) - sinks
        if layer.sliding_window is None and bool(layer.valid.all()):  # every sequence has the same budget
            # block-wise: only the kept keys are touched, however long the prompt
            return sliding_window_attention(call.query, call.key, call.value, None, window=max(1, window), sinks=sinks,
                                            causal=True, scaling=call.scaling, softcap=call.softcap)
        # padding (sinks are each sequence's first real tokens) or a sliding layer: one explicit mask
        lq = call.query.shape[-2]
        rank = valid_rank(layer.valid[:, :1])  # (B, 1, L): position among real tokens
        distance = rank[..., -lq:, None] - rank[..., None, :]
        windows = (budgets - sinks).clamp(min=1).to(distance.device)[:, None, None, None]
        pattern = (distance < windows) | (rank[..., None, :] < sinks)
        return _sdpa(call, self.allowed(call, layer, prefill) & pattern, False)


class H2O(KVCompressionMethod):
    name = "h2o"
    summary = ("H2O: keep heavy hitters (largest attention accumulated over every query so far) plus the most "
               "recent tokens; scores keep accumulating while decoding.")
    params = KVCompressionMethod.params + (
        ParamSpec("recent_ratio", float, 0.5, "share of the budget reserved for the newest tokens", low=0.0, high=1.0),
    )

    def recent(self, budget):
        return (budget * self.config["recent_ratio"]).long()

    def prefill_scores(self, call, layer):
        valid = None if bool(layer.valid.all()) else layer.valid[:, :1]
        layer.scores = accumulated_attention_scores(call.query, call.key, valid, call.scaling)
        return layer.scores

    def decode_scores(self, call, layer):
        positions = torch.arange(call.key.shape[-2] - 1, call.key.shape[-2], device=call.key.device)
        allowed = block_mask(layer.valid, positions, call.key.shape[-2], call.query.shape[1])
        weights = attention_weights(call.query, call.key, allowed, call.scaling)
        layer.scores = layer.scores + _grouped_sum(weights, call.key.shape[1]).sum(dim=-2)
        return layer.scores


class TOVA(KVCompressionMethod):
    name = "tova"
    summary = "TOVA: keep the entries the current (last) query attends to most; re-scored at every step."

    def prefill_scores(self, call, layer):
        valid = None if bool(layer.valid.all()) else layer.valid
        return window_attention_scores(call.query, call.key, valid, call.scaling, window=1)


class KNorm(KVCompressionMethod):
    name = "knorm"
    summary = "Knorm: evict the keys with the largest L2 norm (score = -||k||); no attention weights needed."

    def prefill_scores(self, call, layer):
        return -layer.keys.float().norm(dim=-1)


class SnapKV(KVCompressionMethod):
    name = "snapkv"
    summary = ("SnapKV: after prefill, score prompt keys by the attention of the last `window` queries, pool the "
               "scores, keep the top entries per kv head plus the window; the cache then grows while decoding.")
    evict_while_decoding = False
    params = KVCompressionMethod.params + (
        ParamSpec("window", int, 32, "observation window: last prompt queries whose attention scores keys", low=1),
        ParamSpec("kernel", int, 7, "pooling kernel over the sequence (1 = none)", low=1),
        ParamSpec("pooling", str, "avg", "pooling of the scores", choices=("avg", "max")),
    )

    def recent(self, budget):
        return self.config["window"]

    def prefill_scores(self, call, layer):
        valid = None if bool(layer.valid.all()) else layer.valid
        scores = window_attention_scores(call.query, call.key, valid, call.scaling, self.config["window"])
        return pool_scores(scores, self.config["kernel"], self.config["pooling"], layer.valid)


class PyramidKV(SnapKV):
    name = "pyramidkv"
    summary = ("PyramidKV: SnapKV selection with per-layer budgets decreasing linearly with depth (mean = the "
               "budget; the first layer keeps (1 + spread)x, the last (1 - spread)x).")
    params = SnapKV.params + (
        ParamSpec("spread", float, 0.5, "how much budgets differ between first and last layer", low=0.0, high=1.0,
                  high_open=True),
    )

    def layer_budget(self, real_tokens):
        base = super().layer_budget(real_tokens).float()
        depth = self.site.num_layers
        factor = 1.0 + self.config["spread"] * (1.0 - 2.0 * self.site.layer / max(depth - 1, 1))
        return torch.clamp(torch.round(base * factor).long(), min=1)


class KVQuant(Method):
    name = "kv_quant"
    family = "kv-compressed"
    summary = ("Quantised KV cache (KIVI-style): keys per channel over token groups, values per token over channel "
               "groups, at 2/4/8 bits packed with float16 scales; the first `sinks` tokens and the newest "
               "`residual` stay in full precision. Attention itself is exact over the dequantised entries.")
    model_kinds = ("decoder",)
    interventions = frozenset({"attention", "cache"})
    cache_layer_class = QuantizedKVLayer
    params = (
        ParamSpec("bits", int, 4, "bits per quantised key/value element", choices=(2, 4, 8)),
        ParamSpec("group", int, 32, "tokens per key group / channels per value group", low=1),
        ParamSpec("residual", int, 64, "newest tokens kept in full precision", low=0),
        ParamSpec("sinks", int, 4, "first tokens kept in full precision", low=0),
    )

    def check_site(self, site):
        if site.head_dim % self.config["group"]:
            raise PatchError(f"kv_quant: group={self.config['group']} must divide the head dimension {site.head_dim}")

    def new_cache_layer(self, sliding_window=None):
        if sliding_window is not None:  # a sliding layer is already bounded: leave it as it is
            return None
        c = self.config
        return QuantizedKVLayer(bits=c["bits"], group=c["group"], residual=c["residual"], sinks=c["sinks"])

    def attention(self, call):  # entries are only stored differently: attention is exact
        self.required_cache_layer(call)
        return exact_attention(call)

