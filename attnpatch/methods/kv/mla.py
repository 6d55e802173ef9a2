"""`mla` (MLA conversion, X-EcoMLA / TransMLA-style): the KV cache holds a low-rank latent per
token instead of the keys and values; attention runs on the keys and values rebuilt from it.

The latent starts from SVDs of the pretrained key and value projections (ops/latent.py): values
take the top `rank` left singular vectors; keys are compressed within RoPE's frequency pairs with
complex weights, so the latent of rotated keys is itself rotated and the cache needs no decoupled
rotary part to rebuild keys at their positions (the papers keep RoPE on a separate key part
because their latent is rotation-free; that is the one deviation, and `rope_dims` keeps that
part's role: the fastest-rotating dims of every head stay whole). At full rank (`rank` = kv heads
x head_dim) the model is exactly the dense one. The factors are trainable: attention transfer
distils them with the model frozen, then LoRA recovers the rest.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ...errors import PatchError, warn_once
from ...ops.latent import (compress_keys, compress_values, expand_keys, expand_values, key_factors, output_metric,
                           query_energy, value_factors)
from ...runtime.call import CACHE_OWN
from ...runtime.exact import exact_attention, exact_attention_weights
from ...runtime.layers import LatentKVLayer
from ..base import Method, ParamSpec


class MultiHeadLatentAttention(Method):
    name = "mla"
    family = "kv-compressed"
    summary = ("MLA conversion: the KV cache holds a low-rank latent per token (SVD start from the key/value "
               "projections, keys compressed within RoPE's frequency pairs so the latent is cached rotated); "
               "attention runs on keys and values rebuilt from it; the factors train by attention transfer.")
    model_kinds = ("decoder",)
    interventions = frozenset({"attention", "cache", "parameters"})
    trainable = True
    trainable_note = "the latent's down/up factors of keys and values (attention transfer, model frozen)"
    cache_layer_class = LatentKVLayer
    params = (
        ParamSpec("rank", int, None, "latent dims per token for the keys and (unless value_rank) again for the values "
                  "(even; kv heads x head_dim = full rank, exact); unset = half of that, half the KV cache", low=2,
                  optional=True),
        ParamSpec("value_rank", int, None, "latent dims per token for the values when they differ from the keys' "
                  "(per layer through layer_params)", low=1, optional=True),
        ParamSpec("init", str, "attention", "what the start keeps best: 'attention' weighs key errors by the queries "
                  "that read them and value errors by the output projection (ops/latent.py); 'kv' the keys and values "
                  "themselves (the papers' SVD start)", choices=("attention", "kv")),
        ParamSpec("rope_dims", int, 0, "dims of every key head, the fastest-rotating RoPE pairs, kept whole inside "
                  "the key latent (even; each costs kv heads latent dims)", low=0),
    )

    def check_site(self, site) -> None:
        if site.heads is None:
            raise PatchError(f"mla starts from the key/value projections; {site.path} has no separate ones "
                             "(fused qkv projections such as Phi3's are not supported)")
        full = site.num_kv_heads * site.head_dim
        rank, rope_dims = self.rank(site), self.config["rope_dims"]
        if rank > full or rank % 2:
            raise PatchError(f"mla rank={rank} for {site.label}: it must be even and at most kv heads x head_dim = "
                             f"{full} (the dense cache)")
        if self.value_rank(site) > full:
            raise PatchError(f"mla value_rank={self.value_rank(site)} for {site.label}: at most kv heads x head_dim = "
                             f"{full}")
        if rope_dims % 2 or rope_dims > site.head_dim or rope_dims * site.num_kv_heads > rank:
            raise PatchError(f"mla rope_dims={rope_dims} for {site.label}: it must be even, at most head_dim "
                             f"{site.head_dim}, and rope_dims x kv heads ({site.num_kv_heads}) at most rank={rank}")

    def rank(self, site=None) -> int:
        site = site or self.site
        rank = self.config["rank"]
        return rank if rank is not None else site.num_kv_heads * site.head_dim // 2

    def value_rank(self, site=None) -> int:
        return self.config["value_rank"] if self.config["value_rank"] is not None else self.rank(site)

    def attach(self, module) -> None:
        for name, tensor in self._factors(None).items():
            if name == "attnpatch_key_slots":
                module.register_buffer(name, tensor)
            else:
                setattr(module, name, nn.Parameter(tensor))

    wants_activations = True  # calibrate_from_activations starts the latent from measured keys and values

    def initialise(self, input_covariance: torch.Tensor | None) -> None:
        """Start the factors again from the principal components of this layer's keys and values
        given E[x x^T] of its inputs x augmented with a constant 1 ((hidden+1) square; see
        analysis/activation_calibration.py), or from the projections' SVD when None."""
        module = self.site.module
        with torch.no_grad():
            for name, tensor in self._factors(input_covariance).items():
                getattr(module, name).copy_(tensor)

    def _factors(self, covariance) -> dict[str, torch.Tensor]:
        site = self.site
        q_proj, k_proj, v_proj, o_proj = (getattr(site.module, name) for name in site.heads.projections)
        rank, heads, kv_heads = self.rank(), site.num_heads, site.num_kv_heads
        key_weights = value_metric = None
        if self.config["init"] == "attention":
            key_weights = query_energy(q_proj.weight, q_proj.bias, heads, kv_heads, covariance)
            value_metric = output_metric(o_proj.weight, heads, kv_heads)
        down, up, slots = key_factors(k_proj.weight, k_proj.bias, kv_heads, rank // 2,
                                      self.config["rope_dims"] // 2, covariance, key_weights)
        value_down, value_up = value_factors(v_proj.weight, v_proj.bias, self.value_rank(), covariance, value_metric)
        place = dict(device=k_proj.weight.device, dtype=k_proj.weight.dtype)
        return {"attnpatch_key_down": down.to(**place), "attnpatch_key_up": up.to(**place),
                "attnpatch_value_down": value_down.to(**place), "attnpatch_value_up": value_up.to(**place),
                "attnpatch_key_slots": slots.to(place["device"])}

    # --- the latent and back
    def compress(self, keys: torch.Tensor, values: torch.Tensor):
        m = self.site.module
        return (compress_keys(keys, m.attnpatch_key_down, m.attnpatch_key_slots),
                compress_values(values, m.attnpatch_value_down))

    def expand(self, latent_keys: torch.Tensor, latent_values: torch.Tensor):
        m = self.site.module
        return (expand_keys(latent_keys, m.attnpatch_key_up, m.attnpatch_key_slots),
                expand_values(latent_values, m.attnpatch_value_up, self.site.num_kv_heads))

    def new_cache_layer(self, sliding_window=None):
        if sliding_window is not None:
            warn_once("mla:sliding", "mla: the model's sliding-window layers keep their own (bounded) cache of full "
                      "keys and values; attention there still runs on the latent's rebuild, but saves no memory")
            return None
        return LatentKVLayer(self.compress, self.expand)

    def rebuilt(self, call):
        """The call with keys and values as the latent gives them back (the cache layer rebuilt
        them already when the method keeps the cache)."""
        if call.cache_state == CACHE_OWN:
            return call
        key, value = self.expand(*self.compress(call.key, call.value))
        return dataclasses.replace(call, key=key, value=value)

    def attention(self, call):
        self.last_cache_state = call.cache_state
        return exact_attention(self.rebuilt(call))

    def attention_weights(self, call):
        return exact_attention_weights(self.rebuilt(call))
