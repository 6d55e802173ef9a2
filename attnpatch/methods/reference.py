"""`softmax`: exact attention computed the naive way; the reference every variant is measured against."""

from __future__ import annotations

import torch

from ..ops.reference import naive_attention
from .base import Method, Paper


class SoftmaxAttention(Method):
    name = "softmax"
    paper = Paper('Attention Is All You Need', 2017, "https://arxiv.org/abs/1706.03762")
    deviations = ()
    family = "reference"
    summary = "Exact softmax attention, computed naively in O(n^2); equals the model's eager attention."

    def attention(self, call):
        # masked scores get the dtype's minimum added, as transformers' eager path does, so even
        # fully masked (padding) rows match it
        return naive_attention(
            call.query,
            call.key,
            call.value,
            call.mask,
            causal=call.causal,
            scaling=call.scaling,
            softcap=call.softcap,
            dropout=call.dropout,
            training=call.training,
            masked_value=torch.finfo(call.query.dtype).min,
        )
