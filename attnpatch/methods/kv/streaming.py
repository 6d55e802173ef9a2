"""StreamingLLM: attention sinks plus the most recent tokens."""

from __future__ import annotations

import torch

from ...errors import PatchError
from ...ops.token_ranks import valid_rank
from ...ops.sliding import sliding_window_attention
from ...runtime.exact import sdpa_attention
from ..base import Paper, ParamSpec
from .base import BUDGET_PARAMS, KVCompressionMethod, decode_param
from .eviction import eviction_state


class StreamingLLM(KVCompressionMethod):
    name = "streaming"
    paper = Paper('Efficient Streaming Language Models with Attention Sinks', 2023, "https://arxiv.org/abs/2309.17453")
    deviations = (
        "keys are cached after RoPE at their absolute positions, not rotated by their slot in the cache (the paper's section 3.2): perplexity grows once the text passes the trained length (SmolLM2, trained to 8,192: 113 at 15k, 976-3,794 at 18k-23k tokens; issue 41)",
    )
    shared_deviations = ()  # no head_adaptive: its window is the same for every head
    summary = ("StreamingLLM: keep the first `sinks` tokens and the most recent ones (budget - sinks), during "
               "prefill (attention itself is sinks + window) and decoding.")
    params = BUDGET_PARAMS + (ParamSpec("sinks", int, 4, "attention-sink tokens always kept", low=0),
                              decode_param("hold"))

    @classmethod
    def check_params(cls, params):
        if params["budget"] is not None and params["budget"] <= params["sinks"]:
            raise PatchError(f"method 'streaming' needs budget > sinks, got budget={params['budget']}, "
                             f"sinks={params['sinks']}")

    def recent(self, budget):
        return (budget - self.config["sinks"]).clamp(min=1)

    def score(self, keys, attention, valid):  # sinks and recent entries are all it keeps
        return torch.zeros_like(valid, dtype=torch.float32)

    def fixed_eviction(self, layer, lq):
        """Its held eviction needs no scores: with every slot valid and the slots holding the sinks,
        then the window in position order, the entry leaving the window is in the slot after the one
        freed last (a ring over the window's slots, each refilled by the next token). The layout is
        checked once, where the ring starts; a step with padding or several tokens leaves the ring for
        good (the scored path, which picks the same entries, takes over)."""
        state = eviction_state(layer)
        if state.ring is False or self.config["evict_every"] != 1:
            return None
        sinks = self.config["sinks"]
        if lq != 1 or not layer.all_valid() or (state.ring is not None and layer.length != sinks + state.ring[1]):
            state.ring = False
            return None
        if state.ring is None:
            state.ring = self._start_ring(layer, sinks)
            if not state.ring:
                return None
        slot, size = state.ring
        state.ring = (sinks + (slot - sinks + 1) % size, size)
        return torch.full((*layer.valid.shape[:2], 1), slot, dtype=torch.long, device=layer.valid.device)

    @staticmethod
    def _start_ring(layer, sinks: int) -> tuple[int, int] | bool | None:
        """(the slot of the entry leaving the window, the window's slots) when this step is the first
        one over a budget shared by every sequence and the slots hold the sinks then the window in
        order; None: not yet over budget; False: another layout (the scored path for good)."""
        budgets = eviction_state(layer).budget
        budget = int(budgets[0])
        if layer.length < budget + 1:
            return None
        if layer.length > budget + 1 or budget <= sinks or bool((budgets != budget).any()):
            return False
        positions, newest = layer.positions, layer.seen_tokens - 1
        window = torch.arange(newest - (budget - sinks), newest + 1, dtype=positions.dtype, device=positions.device)
        first = positions[..., :1] + torch.arange(sinks, dtype=positions.dtype, device=positions.device)
        if not (bool((positions[..., sinks:] == window).all()) and bool((positions[..., :sinks] == first).all())):
            return False
        return sinks, budget + 1 - sinks

    def compute_output(self, call, layer, prefill, with_weights=False):
        if not prefill:
            return super().compute_output(call, layer, prefill, with_weights)
        budgets = self.layer_budget(layer.valid[:, 0].sum(-1))  # (B,): each sequence's own window
        sinks = self.config["sinks"]
        window = int(budgets.max()) - sinks
        if layer.sliding_window is None and bool(layer.valid.all()):  # every sequence has the same budget
            # block-wise: only the kept keys are touched, however long the prompt
            return sliding_window_attention(call.query, call.key, call.value, None, window=max(1, window), sinks=sinks,
                                            causal=True, scaling=call.scaling, softcap=call.softcap), None
        # padding (sinks are each sequence's first real tokens) or a sliding layer: one explicit mask
        lq = call.query.shape[-2]
        rank = valid_rank(layer.valid[:, :1])  # (B, 1, L): position among real tokens
        distance = rank[..., -lq:, None] - rank[..., None, :]
        windows = (budgets - sinks).clamp(min=1).to(distance.device)[:, None, None, None]
        pattern = (distance < windows) | (rank[..., None, :] < sinks)
        return sdpa_attention(call, self.allowed(call, layer, prefill) & pattern, False), None
