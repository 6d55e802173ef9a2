"""`sliding_window`: softmax attention over a local window plus optional sink tokens."""

from __future__ import annotations

from ...ops.sliding import sliding_window_attention
from ..base import Method, ParamSpec


class SlidingWindowAttention(Method):
    name = "sliding_window"
    family = "sparse"
    summary = (
        "Each query sees the first `sinks` keys and its `window` nearest keys (causal: the most recent, "
        "itself included; bidirectional: |i-j| < window). Computed block-wise, touching only kept keys."
    )
    params = (
        ParamSpec("window", int, 256, "keys in the local window", low=1),
        ParamSpec("sinks", int, 0, "initial tokens every query also sees (attention sinks)", low=0),
        ParamSpec("block_size", int, 128, "queries processed together", low=1, high=65536),
    )

    def needs_unpadded_rows(self, call) -> bool:  # sinks are a row's first real tokens
        return call.causal and (self.config["sinks"] > 0 or call.query.shape[-2] > 1)

    def attention(self, call):
        return sliding_window_attention(
            call.query,
            call.key,
            call.value,
            call.mask,
            window=self.config["window"],
            sinks=self.config["sinks"],
            causal=call.causal,
            scaling=call.scaling,
            softcap=call.softcap,
            dropout=call.dropout,
            training=call.training,
            block_size=self.config["block_size"],
        )
