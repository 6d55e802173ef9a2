"""`linear`: kernel linear attention with a choice of feature maps."""

from __future__ import annotations

from ...errors import PatchError
from ...ops.linear_fla import fla_causal_linear_attention, fla_kernel, fla_unusable_reason, fla_worth_it
from ...ops.linear import (
    EluFeatureMap,
    HedgehogFeatureMap,
    PerformerFeatureMap,
    ReluFeatureMap,
    TaylorFeatureMap,
    bidirectional_linear_attention,
    causal_linear_attention,
    linear_attention_weights,
)
from ...runtime.layers import RecurrentStateLayer
from ..base import Method, Paper, ParamSpec

# feature_map name -> what attach puts on a module: one map shared by q and k, or (query map, key map)
# (trainable maps are separate per side). Each gets the site, the method's parameters, dtype and device.
FEATURE_MAPS = {
    "elu": lambda site, config, dtype, device: EluFeatureMap(),
    "relu": lambda site, config, dtype, device: ReluFeatureMap(),
    "performer": lambda site, config, dtype, device: PerformerFeatureMap(
        site.head_dim, site.head_dim**-0.5, config["num_features"] or 2 * site.head_dim, config["seed"] + site.layer),
    "hedgehog": lambda site, config, dtype, device: (HedgehogFeatureMap(site.num_heads, site.head_dim, dtype, device),
                                                     HedgehogFeatureMap(site.num_kv_heads, site.head_dim, dtype, device)),
    "taylor": lambda site, config, dtype, device: TaylorFeatureMap(site.head_dim, site.head_dim**-0.5),
}


class LinearAttention(Method):
    name = "linear"
    paper = Paper('Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention', 2020, "https://arxiv.org/abs/2006.16236")
    deviations = ()
    family = "linearized"
    summary = (
        "softmax(QK^T)V replaced by phi(Q)(phi(K)^T V) / phi(Q)(phi(K)^T 1). Causal prefill runs in chunks in "
        "O(n); decoding keeps a fixed-size state (S, z) in the cache instead of growing K/V. Bidirectional "
        "for encoders and diffusion models."
    )
    params = (
        ParamSpec("feature_map", str, "elu", "phi: elu (elu+1), relu, performer (FAVOR+ random features), "
                  "hedgehog (learnable, identity-initialised), taylor (2nd-order exp expansion)",
                  choices=tuple(FEATURE_MAPS)),
        ParamSpec("chunk_size", int, 64, "tokens per chunk of the causal prefill", low=1, high=4096),
        ParamSpec("num_features", int, None, "performer: random features per head (default 2 x head_dim)",
                  low=1, high=65536, optional=True),
        ParamSpec("seed", int, 0, "performer: seed of the random projection (layer index is added)", low=0),
        ParamSpec("backend", str, "auto", "kernel of the causal prefill: 'torch' (chunked matmuls), 'fla' "
                  "(flash-linear-attention's Triton kernel, CUDA only: pip install 'attnpatch[fla]'), 'auto' (the "
                  "fastest measured: torch, on the CPU and on an H200 alike); decoding steps and encoders always "
                  "run the torch path",
                  choices=("auto", "torch", "fla")),
    )
    last_backend: str | None = None  # the kernel the latest causal prefill ran ("torch" or "fla")
    trainable = True
    trainable_note = "only with feature_map='hedgehog' (per-head W and b on q and k)"
    cache_layer_class = RecurrentStateLayer

    @classmethod
    def check_params(cls, params):
        if params["num_features"] is not None and params["feature_map"] != "performer":
            raise PatchError("parameter 'num_features' of method 'linear' only applies to feature_map='performer'")
        if params.get("backend") == "fla" and fla_kernel() is None:
            raise PatchError("backend='fla' needs flash-linear-attention (>= 0.6) and Triton: "
                             "pip install 'attnpatch[fla]' on a machine with a GPU, or use backend='auto' or 'torch'")

    @property
    def is_trainable(self) -> bool:
        return self.config["feature_map"] == "hedgehog"

    def attach(self, module):
        reference = next(module.parameters(), None)
        device = None if reference is None else reference.device
        dtype = None if reference is None else reference.dtype
        maps = FEATURE_MAPS[self.config["feature_map"]](self.site, self.config, dtype, device)
        if isinstance(maps, tuple):
            module.attnpatch_feature_map_q, module.attnpatch_feature_map_k = maps
            return
        # one module shared by q and k (registered once, so its buffers are saved once)
        module.attnpatch_feature_map = maps.to(device) if device is not None else maps

    @staticmethod
    def feature_maps(module):
        """The (query, key) maps `attach` put on the module (one shared, or one each)."""
        shared = module._modules.get("attnpatch_feature_map")
        return (shared, shared) if shared is not None else (module.attnpatch_feature_map_q,
                                                            module.attnpatch_feature_map_k)

    @classmethod
    def features(cls, call):
        """phi(q), phi(k) of the call."""
        map_q, map_k = cls.feature_maps(call.module)
        return map_q(call.query, is_query=True), map_k(call.key, is_query=False)

    def attention_weights(self, call):
        fq, fk = self.features(call)
        return linear_attention_weights(fq, fk, causal=call.causal, key_valid=call.key_valid())

    def attention(self, call):
        fq, fk = self.features(call)
        key_valid = call.key_valid()
        if not call.causal:
            return bidirectional_linear_attention(fq, fk, call.value, key_valid=key_valid)
        layer = call.cache_layer
        state = None if layer is None else layer.state
        # `auto` is torch: on an H200 its prefill took 0.74-0.98x fla's time at 2k-128k tokens
        # (eval/results/gpu/linear_backends.txt), so fla runs only when named
        backend = self.config.get("backend", "torch")
        if backend == "fla" and fla_worth_it(fq.shape[-2], fk.shape[-2], fq.shape[1]):
            reason = fla_unusable_reason(fq)
            if reason is None:
                self.last_backend = "fla"
                out, state = fla_causal_linear_attention(fq, fk, call.value, state=state, key_valid=key_valid)
                if layer is not None:
                    layer.state = state
                return out
            raise RuntimeError(f"linear: backend='fla' cannot run here: {reason}; use backend='auto' or 'torch' "
                               "(the torch path)")
        if fq.shape[-2] > 1:
            self.last_backend = "torch"
        out, state = causal_linear_attention(fq, fk, call.value, state=state, key_valid=key_valid,
                                             chunk_size=self.config["chunk_size"])
        if layer is not None:
            layer.state = state
        return out
