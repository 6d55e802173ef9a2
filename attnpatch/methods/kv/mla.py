"""`mla` (MLA conversion, X-EcoMLA / TransMLA-style): the KV cache holds a low-rank latent per
token instead of the keys and values; attention runs on the keys and values rebuilt from it.

The latent starts from SVDs of the pretrained key and value projections (ops/latent.py), or from
the principal components of measured keys and values (analysis/activation_calibration.py): values
take the top `value_rank` components. Keys, by default (`keys="pre_rope"`), are compressed before
RoPE with any mixing of dims and rotated again at their positions when rebuilt; the cache keeps
each token's position beside the latent (3 columns; the model's rotary embedding gives the angles).
This is the papers' deviation that matters: they keep RoPE on a small decoupled key part and
compress the rest without positions, which changes the model; here the full-rank latent is exactly
the dense model. `keys="rotated"` compresses rotated keys within RoPE's frequency pairs with
complex weights instead (the latent is then rotated with them and needs no positions, but it can
only mix the kv heads of one frequency: on SmolLM2-135M at half the KV bytes its start has
perplexity 43.5 against 32.4 before RoPE). The factors are trainable: attention transfer distils
them with the model frozen, then LoRA recovers the rest.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ...errors import PatchError, warn_once
from ...ops.latent import (POSITION_COLUMNS, apply_rope, compress_keys, compress_values, expand_keys, expand_values,
                           key_factors, output_metric, position_columns, positions_from_columns, query_energy,
                           value_factors)
from ...runtime.call import CACHE_OWN
from ...runtime.exact import exact_attention, exact_attention_weights
from ...runtime.layers import LatentKVLayer
from ..base import Method, Paper, ParamSpec
from ..wiring import model_parts


class MultiHeadLatentAttention(Method):
    name = "mla"
    paper = Paper("Towards Economical Inference: Enabling DeepSeek's Multi-Head Latent Attention in Any Transformer-based LLMs (MHA2MLA)", 2025, "https://arxiv.org/abs/2502.14837")
    deviations = (
        "a decoding step rebuilds every cached token's keys and values from the latent instead of attending the latent with the up-projections absorbed: memory falls (0.51 of dense), decode compute does not (0.47x dense tokens/s after a 4k prompt; issue 41)",
    )
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
                  "(kv heads x head_dim = full rank, exact; even for keys='rotated'); unset = half of that, half "
                  "the KV cache", low=2, optional=True),
        ParamSpec("value_rank", int, None, "latent dims per token for the values when they differ from the keys' "
                  "(per layer through layer_params)", low=1, optional=True),
        ParamSpec("keys", str, "pre_rope", "where keys are compressed: 'pre_rope' before RoPE (any mix of dims; "
                  "RoPE applied again from each cached token's position), 'rotated' after it within RoPE's "
                  "frequency pairs (no positions needed, a narrower latent)", choices=("pre_rope", "rotated")),
        ParamSpec("init", str, "attention", "what the start keeps best: 'attention' weighs value errors by the output "
                  "projection and (keys='rotated') key errors by the queries that read them (ops/latent.py); 'kv' the "
                  "keys and values themselves (the papers' SVD start). Keys before RoPE always start from their "
                  "own components (weighting them measured worse)", choices=("attention", "kv")),
        ParamSpec("rope_dims", int, 0, "keys='rotated' only: dims of every key head, the fastest-rotating RoPE pairs, "
                  "kept whole inside the key latent (even; each costs kv heads latent dims)", low=0),
    )

    def check_site(self, site) -> None:
        if site.heads is None:
            raise PatchError(f"mla starts from the key/value projections; {site.path} has no separate ones "
                             "(fused qkv projections such as Phi3's are not supported)")
        full = site.num_kv_heads * site.head_dim
        rank, rope_dims = self.rank(site), self.config["rope_dims"]
        if self.pre_rope:
            if rope_dims:
                raise PatchError(f"mla rope_dims={rope_dims}: it applies to keys='rotated' (keys before RoPE mix every "
                                 "dim already); pass keys='rotated' or drop rope_dims")
            if rank > full:
                raise PatchError(f"mla rank={rank} for {site.label}: at most kv heads x head_dim = {full} (the dense "
                                 "cache)")
        elif rank > full or rank % 2:
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

    @property
    def pre_rope(self) -> bool:
        return self.config["keys"] == "pre_rope"

    def attach(self, module) -> None:
        for name, tensor in self._factors(None).items():
            if name == "attnpatch_key_slots":
                module.register_buffer(name, tensor)
            else:
                setattr(module, name, nn.Parameter(tensor))
        self.rotary, self.positions = None, None
        if self.pre_rope:  # each call's token positions, to cache beside the latent and rotate keys again
            self._position_hook = module.register_forward_pre_hook(self._remember_positions, with_kwargs=True)

    def _remember_positions(self, module, args, kwargs) -> None:
        self.positions = kwargs.get("position_ids")

    def detach(self, module) -> None:
        if self.pre_rope:
            self._position_hook.remove()
        super().detach(module)

    @classmethod
    def finish_patch(cls, model, adapter, placements):
        """keys='pre_rope' rebuilds keys at any cached position with the model's own rotary embedding,
        the one beside each patched stack of layers (asked of the adapter)."""
        for site, method in placements:
            if not method.pre_rope:
                continue
            try:
                method.rotary = model_parts([site], "mla").rotary_embedding(site, "mla keys='pre_rope'")
            except PatchError as error:
                raise PatchError(f"{error}; use keys='rotated', which needs no positions") from None
        return None

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
        weighted = self.config["init"] == "attention"
        value_metric = output_metric(o_proj.weight, heads, kv_heads) if weighted else None
        value_down, value_up = value_factors(v_proj.weight, v_proj.bias, self.value_rank(), covariance, value_metric)
        place = dict(device=k_proj.weight.device, dtype=k_proj.weight.dtype)
        factors = {"attnpatch_value_down": value_down.to(**place), "attnpatch_value_up": value_up.to(**place)}
        if self.pre_rope:  # keys before RoPE are (augmented) linear in the inputs, as values are
            down, up = value_factors(k_proj.weight, k_proj.bias, rank, covariance)
        else:
            key_weights = query_energy(q_proj.weight, q_proj.bias, heads, kv_heads, covariance) if weighted else None
            down, up, slots = key_factors(k_proj.weight, k_proj.bias, kv_heads, rank // 2,
                                          self.config["rope_dims"] // 2, covariance, key_weights)
            factors["attnpatch_key_slots"] = slots.to(place["device"])
        return {"attnpatch_key_down": down.to(**place), "attnpatch_key_up": up.to(**place), **factors}

    # --- the latent and back
    def compress(self, keys: torch.Tensor, values: torch.Tensor):
        m = self.site.module
        latent_values = compress_values(values, m.attnpatch_value_down)
        if not self.pre_rope:
            return compress_keys(keys, m.attnpatch_key_down, m.attnpatch_key_slots), latent_values
        positions = self._call_positions(keys)
        unrotated = apply_rope(keys, *self.rotary(keys, positions), inverse=True)
        latent = compress_values(unrotated, m.attnpatch_key_down)
        return torch.cat([latent, position_columns(positions, latent.dtype)], dim=-1), latent_values

    def _call_positions(self, keys: torch.Tensor) -> torch.Tensor:
        if self.rotary is None:
            raise PatchError("mla keys='pre_rope' was not wired to the model's rotary embedding (finish_patch did not "
                             "run); patch the model with patch_model")
        if self.positions is None:
            raise PatchError(f"mla keys='pre_rope' needs the position_ids the model passes to {self.site.path}, and "
                             "this call had none; use keys='rotated', which needs no positions")
        positions = self.positions.to(keys.device).expand(keys.shape[0], -1)
        earlier = keys.shape[2] - positions.shape[-1]
        if earlier > 0:  # keys the model's own cache held (a sliding-window layer): the tokens just before these
            before = positions[:, :1] - torch.arange(earlier, 0, -1, device=keys.device)
            positions = torch.cat([before.clamp_min(0), positions], dim=-1)
        elif earlier < 0:
            raise PatchError(f"mla keys='pre_rope': {positions.shape[-1]} positions for {keys.shape[2]} keys")
        return positions

    def expand(self, latent_keys: torch.Tensor, latent_values: torch.Tensor):
        m = self.site.module
        values = expand_values(latent_values, m.attnpatch_value_up, self.site.num_kv_heads)
        if not self.pre_rope:
            return expand_keys(latent_keys, m.attnpatch_key_up, m.attnpatch_key_slots), values
        latent, columns = latent_keys.split([latent_keys.shape[-1] - POSITION_COLUMNS, POSITION_COLUMNS], dim=-1)
        unrotated = expand_values(latent, m.attnpatch_key_up, self.site.num_kv_heads)
        return apply_rope(unrotated, *self.rotary(unrotated, positions_from_columns(columns))), values

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
