"""`sliding_window`: softmax attention over a local window plus optional sink tokens."""

from __future__ import annotations

from ...ops.sliding import sliding_window_attention
from ...runtime.layers import DuoHeadLayer
from ..base import Method, Paper, ParamSpec
from ..heads.duo import window_cache_attention


class SlidingWindowAttention(Method):
    name = "sliding_window"
    paper = Paper('Longformer: The Long-Document Transformer (window); Efficient Streaming Language Models with Attention Sinks (sinks)', 2020, "https://arxiv.org/abs/2004.05150")
    deviations = ()
    family = "sparse"
    summary = (
        "Each query sees the first `sinks` keys and its `window` nearest keys (causal: the most recent, "
        "itself included; bidirectional: |i-j| < window). Computed block-wise, touching only kept keys. "
        "Decoding keeps only the sinks and the newest window - 1 tokens in the cache (exact: no later query "
        "sees older ones), so memory and step cost stay flat with context length."
    )
    cache_layer_class = DuoHeadLayer
    params = (
        ParamSpec("window", int, 256, "keys in the local window", low=1),
        ParamSpec("sinks", int, 0, "initial tokens every query also sees (attention sinks)", low=0),
        ParamSpec("block_size", int, 64, "queries processed together (each block gathers window + block_size keys: "
                  "64 measured 1.10x the attention-free floor at 16k tokens with window 256, 128 gave 1.22x)",
                  low=1, high=65536),
    )

    def new_cache_layer(self, sliding_window=None):  # every kv head streams: the duo_heads store with no retrieval head
        heads = list(range(self.site.num_kv_heads))
        return DuoHeadLayer([], heads, self.config["sinks"], self.config["window"], sliding_window)

    def needs_unpadded_rows(self, call) -> bool:  # sinks are a row's first real tokens (the cache counts them itself)
        return call.cache_layer is None and call.causal and (self.config["sinks"] > 0 or call.query.shape[-2] > 1)

    def attention(self, call):
        layer = call.cache_layer
        if isinstance(layer, DuoHeadLayer):
            if call.mask is not None:  # padding among the new tokens
                lq = call.query.shape[-2]
                layer.mark_new_padding(call.mask[..., -lq:].any(dim=-2).any(dim=1))
            out = window_cache_attention(call, layer, self.config["sinks"], self.config["window"])
            layer.trim()
            return out
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
