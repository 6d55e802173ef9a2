"""`lolcats`: exact softmax over a sliding window of recent tokens + linear attention over the rest,
one shared normaliser, a learnable per-head mix (LoLCATs' attention; see ops/hybrid.py)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ...ops.hybrid import hybrid_attention, hybrid_attention_weights, hybrid_decoding_step
from ...runtime.layers import HybridWindowLayer
from ..base import Paper, ParamSpec
from .linear import LinearAttention


def _with_default(specs, name, default):
    return tuple(ParamSpec(**{**s.__dict__, "default": default}) if s.name == name else s for s in specs)


class LolcatsAttention(LinearAttention):
    name = "lolcats"
    paper = Paper('LoLCATs: On Low-Rank Linearizing of Large Language Models', 2024, "https://arxiv.org/abs/2410.10254")
    deviations = ()
    family = "linearized"
    summary = (
        "LoLCATs hybrid: softmax over the `window` most recent keys plus linear attention over everything older, "
        "mixed in one normalisation by a learnable per-head gate (sigmoid, init `gate_init`). Chunked prefill "
        "O(n * window); decoding keeps the window's K/V plus a fixed-size linear state. Bidirectional for "
        "encoders: softmax within |i-j| < window, linear elsewhere."
    )
    # no `backend`: flash-linear-attention has no kernel for the window + linear mix
    params = tuple(spec for spec in _with_default(LinearAttention.params, "feature_map", "hedgehog")
                   if spec.name != "backend") + (
        ParamSpec("window", int, 64, "keys attended with exact softmax", low=1),
        ParamSpec("gate_init", float, 0.1, "initial weight of the softmax window in the mix", low=0.0, high=1.0,
                  low_open=True, high_open=True),
    )
    trainable = True
    trainable_note = "the per-head mixing gate, and the feature maps with feature_map='hedgehog'"
    cache_layer_class = HybridWindowLayer

    @property
    def is_trainable(self) -> bool:
        return True

    def attach(self, module):
        super().attach(module)
        reference = next(module.parameters())
        init = math.log(self.config["gate_init"] / (1 - self.config["gate_init"]))
        module.attnpatch_window_gate = nn.Parameter(
            torch.full((self.site.num_heads,), init, dtype=reference.dtype, device=reference.device))

    def new_cache_layer(self, sliding_window=None):
        return HybridWindowLayer(self.config["window"], sliding_window=sliding_window)

    def attention_weights(self, call):
        fq, fk = self.features(call)
        return hybrid_attention_weights(
            call.query, call.key, fq, fk, torch.sigmoid(call.module.attnpatch_window_gate), window=self.config["window"],
            scaling=call.scaling, causal=call.causal, key_valid=call.key_valid(), softcap=call.softcap)

    def attention(self, call):
        layer = call.cache_layer if isinstance(call.cache_layer, HybridWindowLayer) else None
        window, lk = self.config["window"], call.key.shape[-2]
        state = None if layer is None else layer.state
        if layer is not None and call.causal and call.query.shape[-2] == 1 and lk <= window:
            # a decoding step: the window's keys are attended exactly; only the key leaving it needs phi(k).
            # The gate goes in as its logit, which is the parameter itself (g = sigmoid(parameter))
            map_q, map_k = self.feature_maps(call.module)
            fq, fk = map_q(call.query, is_query=True), map_k(call.key[:, :, :max(0, lk - (window - 1))], is_query=False)
            out, state = hybrid_decoding_step(
                call.query, call.key, call.value, fq, fk, call.module.attnpatch_window_gate, window=window,
                scaling=call.scaling, key_valid=call.key_valid(), state=state, softcap=call.softcap)
        else:
            fq, fk = self.features(call)
            out, state = hybrid_attention(
                call.query, call.key, call.value, fq, fk, torch.sigmoid(call.module.attnpatch_window_gate),
                window=window, scaling=call.scaling, causal=call.causal, key_valid=call.key_valid(), state=state,
                block_size=self.config["chunk_size"], softcap=call.softcap)
        if layer is not None:
            layer.state = state
            layer.trim()
        return out
