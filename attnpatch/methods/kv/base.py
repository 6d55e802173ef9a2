"""What every KV compression method shares. A method is a *scorer*: it says which cache entries
matter (`score`), and this base does the rest: the budget per sequence, attention over what is
kept, the attention mass the scorer asked for, padding, sinks and recent entries, the model's own
sliding window, and writing the kept entries to the `CompressedKVLayer`.

Budget: `budget` entries, or floor((1 - compression) x real prompt tokens) per sequence (padding
never counts; compression=0 keeps the model's own cache, exactly dense). Prefill: attention over
the whole prompt is exact (a method may override `compute_output`, as streaming does), then the
cache is cut to the budget by the score. After the prompt, `decode` says what happens: "hold"
keeps the cache at the budget, evicting one entry per new token but never the current step's
tokens; "grow" compresses once and lets the cache grow. Each method's default is its paper's.
Selection is per kv head with attention summed over the head's query group (GQA), and per sequence.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ...ops.attention_weights import block_mask
from ...ops.kv_select import (accumulated_attention_scores, compact, evict_lowest, select_mask,
                              window_attention_scores)
from ...runtime.exact import exact_attention, one_query_attention, sdpa_attention
from ...runtime.layers import CompressedKVLayer
from ..base import Method, ParamSpec
from .eviction import EvictionState, eviction_state


def decode_param(default: str) -> ParamSpec:
    """What happens after the prompt is compressed; each method's default is its paper's."""
    return ParamSpec("decode", str, default, "after the prompt: 'grow' compresses it once and lets new tokens add "
                     "to the cache (SnapKV, PyramidKV, Knorm); 'hold' keeps the cache at the budget, evicting "
                     "by score but never the tokens of the current step (StreamingLLM, H2O, TOVA)",
                     choices=("grow", "hold"))


BUDGET_PARAMS = (
    ParamSpec("compression", float, 0.5, "fraction of the prompt's cache entries evicted", low=0.0, high=1.0,
              high_open=True),
    ParamSpec("budget", int, None, "cache entries kept per sequence and kv head (overrides compression)",
              low=1, optional=True),
    ParamSpec("evict_every", int, 1, "with decode='hold': evict once every this many decoding steps, down to the "
              "budget (up to budget + evict_every - 1 entries are held between); 1 = every step, as in the papers",
              low=1),
)


HEAD_ADAPTIVE_PARAM = ParamSpec(
    "head_adaptive", float, None, "AdaKV: share the sequence's budget over its kv heads by score (heads whose "
    "attention is spread keep more); each head first keeps this share of its own budget (0.2 in the paper)",
    low=0.0, high=1.0, optional=True)


class KVCacheMethod(Method):
    """What every method of the family is: a decoder method acting on the KV cache through its own
    cache layer (attention and cache interventions)."""

    family = "kv-compressed"
    model_kinds = ("decoder",)
    interventions = frozenset({"attention", "cache"})


class KVCompressionMethod(KVCacheMethod):
    cache_layer_class = CompressedKVLayer
    exclusive_params = (("budget", "compression"),)
    shared_deviations = ("with head_adaptive (AdaKV's uneven per-head budgets) every layer is stored as wide as its fullest "
                         "kv head: snapkv head_adaptive=0.2 at compression 0.5 holds 0.68 of dense bytes, not 0.5 (issue 41)",)
    accumulates: ClassVar[bool] = False  # scores add up over calls (H2O); the base keeps the running sum
    params = BUDGET_PARAMS + (ParamSpec("sinks", int, 0, "first tokens always kept", low=0), HEAD_ADAPTIVE_PARAM,
                              decode_param("hold"))

    # --- what a scorer defines
    def observed_queries(self) -> int | None:
        """How many of a call's newest queries' attention `score` needs: 0 = none (the default),
        k = the last k, None = every query."""
        return 0

    def score(self, keys: torch.Tensor, attention: torch.Tensor | None, valid: torch.Tensor) -> torch.Tensor:
        """(B, Hkv, L) score per cache entry, higher = kept. keys (B, Hkv, L, D): the layer's entries
        (after RoPE); attention (B, Hkv, L): the attention mass each entry received from the observed
        queries, summed over them and over the kv head's query group, padding excluded (None when
        `observed_queries()` is 0); valid (B, Hkv, L): real entries (others are never kept)."""
        raise NotImplementedError

    def recent(self, budget: torch.Tensor) -> torch.Tensor | int:
        """Newest entries always kept: an int, or (B,) per sequence from its own budget (a padded
        sequence keeps what it would keep alone)."""
        return 0

    def fixed_eviction(self, layer: CompressedKVLayer, lq: int) -> torch.Tensor | None:
        """The slots (B, Hkv, e) a held decoding step frees, where the method knows them without
        scores (StreamingLLM); None: score and select."""
        return None

    def new_cache_layer(self, sliding_window=None):
        if self.config["budget"] is None and self.config["compression"] == 0:
            return None  # nothing is ever evicted: the model's own cache, exactly dense
        return super().new_cache_layer(sliding_window)

    def layer_budget(self, real_tokens: torch.Tensor) -> torch.Tensor:
        if self.config["budget"] is not None:
            return torch.full_like(real_tokens, self.config["budget"])
        # floor in float64, the rounding kvpress uses, so equal settings keep equal entries
        kept = torch.floor(real_tokens.double() * (1.0 - self.config["compression"]))
        return torch.clamp(kept.long(), min=1)

    # --- shared machinery
    def attention(self, call):
        layer = self.required_cache_layer(call)
        if layer is None:  # the model runs without a cache (warned): nothing to compress
            return exact_attention(call)
        lq = call.query.shape[-2]
        if call.mask is not None:  # padding of the new tokens, from the model's mask
            layer.mark_new_padding(call.mask[..., -lq:].any(dim=-2).any(dim=1))  # (B or 1, lq)
        state = eviction_state(layer)
        prefill = not state.prefilled
        # a compressed context (compress_context) grows whatever the method does while decoding
        policy = state.decode or self.config["decode"]
        holds = policy == "hold"
        out, attention = self.compute_output(call, layer, prefill, with_weights=holds and self.observed_queries() != 0)
        if layer.sliding_window is not None:  # entries the model's own window no longer reaches: freed
            newest = layer.seen_tokens - 1
            layer.valid &= (newest - layer.positions) < layer.sliding_window - 1
        if prefill:
            state.budget = self.layer_budget(layer.valid[:, 0].sum(-1))
            layer.headroom = not holds  # a held cache never needs more than its budget + one step
        elif not holds:  # compress once: the cache grows (freed slots are reused)
            state.budget = state.budget + lq
            return out
        else:  # held: evict every `evict_every` steps (scores that accumulate are updated every step)
            state.pending += 1
            if state.pending < self.config["evict_every"] and not self.accumulates:
                return out
            freed = self.fixed_eviction(layer, lq)
            if freed is not None:  # the slots to free are known without scoring anything
                state.pending = 0
                layer.free(freed)
                return out
        scores = self._scores(call, layer, prefill, attention)
        if not prefill and state.pending < self.config["evict_every"]:
            return out
        state.pending = 0
        # the tokens of this step are never evicted in it (nor the budget below them)
        if prefill:
            budget, recent = state.budget, self.recent(state.budget)
        else:
            budget, recent = self._step_limits(state, lq)
        adaptive = self.config.get("head_adaptive")
        if prefill:
            if layer.stored_tokens > int(budget.max()) or bool((layer.valid.sum(-1) > budget[:, None]).any()):
                kept = select_mask(scores, layer.valid, budget, sinks=self.config["sinks"], recent=recent,
                                   head_adaptive=adaptive)
                layer.keep(*compact(kept))  # once: pack the kept entries, freeing the prompt's storage
            return out
        evicted = None
        if adaptive is None:  # a step over budget: drop the lowest entries without sorting the cache
            evicted = evict_lowest(scores, layer.valid, layer.positions, budget, self.config["sinks"], recent,
                                   layer.seen_tokens - 1)
        if evicted is None:
            evicted = select_mask(scores, layer.valid, budget, sinks=self.config["sinks"], recent=recent,
                                  positions=layer.positions, head_adaptive=adaptive), None
        layer.evict(*evicted)  # free the evicted slots in place; the next tokens are written there
        return out

    def _step_limits(self, state: EvictionState, lq: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A held step's budget and recent window, at least the step's own tokens; reused while the
        layer's budget tensor stays the same (every step of a held cache). Kept on the method, not the
        cache, so the cache's bytes stay exactly its own."""
        cached = getattr(self, "_step_limits_cache", None)
        if cached is not None and cached[0] is state.budget and cached[1] == lq:
            return cached[2], cached[3]
        budget = torch.clamp(state.budget, min=lq)
        recent = torch.as_tensor(self.recent(state.budget), device=budget.device)
        recent = torch.clamp(recent.expand_as(budget), min=lq)
        self._step_limits_cache = (state.budget, lq, budget, recent)
        return budget, recent

    def _scores(self, call, layer: CompressedKVLayer, prefill: bool, attention: torch.Tensor | None = None) -> torch.Tensor:
        """The scorer's scores, with the attention mass it asked for (given, or computed in query
        blocks, never (L x L) at once) and, for accumulating scorers, the running sum kept on the layer."""
        valid = layer.valid[:, :1] if prefill else layer.valid  # identical heads until the first eviction
        visible = None if (bool(valid.all()) if prefill else layer.all_valid()) else valid
        window = self.observed_queries()
        positions = None if prefill else layer.positions  # stored out of order once slots are reused
        if attention is None and window is None:
            attention = accumulated_attention_scores(call.query, layer.keys, visible, call.scaling,
                                                     softcap=call.softcap, key_positions=positions)
        elif attention is None and window > 0:
            attention = window_attention_scores(call.query, layer.keys, visible, call.scaling,
                                                min(window, call.query.shape[-2]), softcap=call.softcap,
                                                key_positions=positions)
        scores = self.score(layer.keys, attention, layer.valid)
        if self.accumulates:
            layer.scores = scores if prefill else layer.scores + scores
            return layer.scores
        return scores

    def compute_output(self, call, layer: CompressedKVLayer, prefill: bool,
                       with_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The call's attention output, and, when asked (`with_weights`) and free, the attention mass
        of its one query per kv head (B, Hkv, L) for the scorer (else None: `_scores` computes it)."""
        lq, length = call.query.shape[-2], call.key.shape[-2]
        window = layer.sliding_window
        if prefill and lq == length and bool(layer.valid.all()) and (window is None or length <= window):
            return sdpa_attention(call, None, True), None
        if not prefill and lq == 1 and window is None and call.softcap is None:  # a decoding step
            valid = None if layer.all_valid() else layer.valid
            return one_query_attention(call.query, call.key, call.value, valid, call.scaling, with_weights)
        return sdpa_attention(call, self.allowed(call, layer, prefill), False), None

    def allowed(self, call, layer: CompressedKVLayer, prefill: bool) -> torch.Tensor:
        """(B, 1 or Hq, Lq, L) boolean: valid, causal by position, and inside the model's own sliding window."""
        lq, length = call.query.shape[-2], call.key.shape[-2]
        # identical heads until the first eviction; afterwards entries sit in reused slots, out of order
        valid, positions = (layer.valid[:, :1], None) if prefill else (layer.valid, layer.positions)
        q_positions = torch.arange(layer.seen_tokens - lq, layer.seen_tokens, device=call.query.device)
        allowed = block_mask(valid, q_positions, length, call.query.shape[1], positions)
        if layer.sliding_window is not None:
            distance = q_positions[:, None] - layer.positions[:, : allowed.shape[1] if prefill else None, None, :].long()
            in_window = distance < layer.sliding_window
            if in_window.shape[1] != allowed.shape[1]:
                in_window = in_window.repeat_interleave(allowed.shape[1] // in_window.shape[1], dim=1)
            allowed = allowed & in_window
        return allowed
