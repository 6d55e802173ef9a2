"""kv_quant: the KV cache stored quantised (KIVI-style); attention itself stays exact."""

from __future__ import annotations

from ...errors import PatchError
from ...runtime.exact import exact_attention
from ...runtime.layers import QuantizedKVLayer
from ..base import Paper, ParamSpec
from .base import KVCacheMethod


class KVQuant(KVCacheMethod):
    name = "kv_quant"
    paper = Paper('KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache', 2024, "https://arxiv.org/abs/2402.02750")
    deviations = ()
    summary = ("Quantised KV cache (KIVI-style): keys per channel over token groups, values per token over channel "
               "groups, at 2/4/8 bits packed with float16 scales; the first `sinks` tokens and the newest "
               "`residual` stay in full precision. Attention itself is exact over the dequantised entries.")
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
        layer = self.required_cache_layer(call)
        if layer is not None and layer.pending is not None:  # the prompt: store it, padding stripped
            layer.commit(call.leading_padding())
        return exact_attention(call)

