"""Adapter for transformers models that route attention through `AttentionInterface`.

Routing is per module: a patched attention module gets a shallow copy of its config whose
`_attn_implementation` is "attnpatch", so only the patched modules call attnpatch's attention
function while masks, caches and every other module keep the model's own implementation.
Unpatching puts the original config object back, which restores the model bit for bit.
"""

from __future__ import annotations

import copy

from torch import nn

from ..errors import PatchError, warn_once
from ..routing.cache import state_layer_for
from ..routing.dispatch import run_method
from ..routing.normalise import normalise_mask
from ..runtime.cache import find_cache
from ..runtime.call import (
    CACHE_ABSENT,
    CACHE_DECLINED,
    CACHE_OWN,
    CACHE_UNCHECKED,
    AttentionCall,
)
from .base import Adapter, AttentionSite, split_layer_path, tower_depths
from .hf_introspection import _head_access, _routes_through_interface
from .parts import ModelParts

ATTENTION_NAME = "attnpatch"
METHOD_ATTR = "_attnpatch_method"
CACHE_ATTR = "_attnpatch_cache_layer"  # (layer or None, cache state) for the call in progress
SAW_CACHE_ATTR = "_attnpatch_saw_cache"  # per forward of the model: did this module find the cache?
CALLS_ATTR = "_attnpatch_calls_before"  # the method's call count when the module's forward started
ORIGINAL_CONFIG_ATTR = "_attnpatch_original_config"
HOOKS_ATTR = "_attnpatch_hooks"

def _attention_function(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    method = module.__dict__.get(METHOD_ATTR)
    if method is None:
        raise RuntimeError(
            f"{type(module).__name__} is routed to attnpatch but carries no method; "
            "was it copied out of a patched model? Call attnpatch.unpatch_model on the model."
        )
    layer, cache_state = module.__dict__.get(CACHE_ATTR, (None, CACHE_UNCHECKED))
    is_causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", False)) if is_causal is None else bool(is_causal)
    call = AttentionCall(
        module=module,
        query=query,
        key=key,
        value=value,
        mask=normalise_mask(attention_mask, key.shape[-2]),
        causal=causal,
        scaling=query.shape[-1] ** -0.5 if scaling is None else float(scaling),
        softcap=kwargs.get("softcap"),
        dropout=float(dropout or 0.0),
        training=module.training,
        cache_layer=layer,
        cache_state=cache_state,
        model_window=kwargs.get("sliding_window"),
    )
    out = run_method(method, call)  # (B, Hq, Lq, D)
    return out.transpose(1, 2).contiguous(), None


def _register_attention_function() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, _attention_function)


def _capture_cache(module, args, kwargs):
    method = module.__dict__.get(METHOD_ATTR)
    cache = find_cache(args, kwargs)
    module.__dict__[SAW_CACHE_ATTR] = cache is not None
    if cache is None:
        if kwargs.get("use_cache"):
            raise PatchError(
                f"{method.name}: {type(module).__name__} was called with use_cache=True but attnpatch found no "
                f"transformers Cache among its arguments (keywords: {sorted(kwargs)}); this transformers version "
                "passes the cache in a way attnpatch does not know, and the method would run without its cache"
            )
        module.__dict__[CACHE_ATTR] = (None, CACHE_ABSENT)
        return
    layer = state_layer_for(cache, module.layer_idx, method)
    module.__dict__[CACHE_ATTR] = (layer, CACHE_OWN if layer is not None else CACHE_DECLINED)


def _release_cache(module, args, kwargs, output):
    module.__dict__.pop(CACHE_ATTR, None)


def _keeps_state(site: AttentionSite, method) -> bool:
    return "attention" in method.interventions and method.uses_state() and hasattr(site.module, "layer_idx")


def _count_calls(module, args, kwargs):
    module.__dict__[CALLS_ATTR] = module.__dict__[METHOD_ATTR].calls


def _check_called(module, args, kwargs, output):
    """A patched module's forward must have called attnpatch's attention function: a release that
    picks its attention another way would otherwise run the model's own attention unnoticed."""
    method = module.__dict__[METHOD_ATTR]
    if method.calls == module.__dict__.pop(CALLS_ATTR, method.calls - 1):
        import transformers

        raise PatchError(
            f"{method.name}: {type(module).__name__}.forward ran without calling attnpatch's attention function "
            f"(transformers {transformers.__version__} picks its attention another way); the method is not active. "
            "Use a transformers version in the range the README states."
        )


def _output_cache(output):
    """The Cache a model's forward returned (a ModelOutput field or a tuple entry), or None."""
    values = output.values() if hasattr(output, "values") else output if isinstance(output, tuple) else ()
    return find_cache(tuple(values), {})


class TransformersAdapter(Adapter):
    name = "transformers"

    def applies_to(self, model: nn.Module) -> bool:
        try:
            from transformers import PreTrainedModel
        except ImportError:  # pragma: no cover
            return False
        return isinstance(model, PreTrainedModel)

    def sites(self, model: nn.Module) -> list[AttentionSite]:
        found = []
        for path, module in model.named_modules():
            config = getattr(module, "config", None)
            if config is None or not hasattr(config, "_attn_implementation"):
                continue
            has_projections = all(hasattr(module, p) for p in ("q_proj", "k_proj", "v_proj")) or hasattr(
                module, "qkv_proj"
            )
            if not has_projections or not _routes_through_interface(type(module)):
                continue
            split = split_layer_path(path)
            if split is None:
                continue
            found.append((path, module, config, *split))
        counts = tower_depths((tower, layer) for *_, tower, layer in found)
        sites, parts = [], ModelParts(model)
        for path, module, config, tower, layer in found:
            num_heads = getattr(module, "num_heads", None) or config.num_attention_heads
            head_dim = getattr(module, "head_dim", None) or config.hidden_size // num_heads
            num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
            heads = _head_access(module)
            if heads is not None:  # the projections' shapes are the truth once heads were pruned
                q, k = getattr(module, heads.projections[0]), getattr(module, heads.projections[1])
                num_heads, num_kv_heads = q.out_features // head_dim, k.out_features // head_dim
            # CLIP's text tower is causal through a call-time flag, not the module attribute
            causal = bool(getattr(module, "is_causal", False)) or (
                "text_model" in tower and getattr(config, "model_type", "").startswith("clip")
            )
            kind = "decoder" if getattr(module, "is_causal", False) else "encoder"
            sites.append(
                AttentionSite(
                    path=path,
                    module=module,
                    tower=tower,
                    layer=layer,
                    num_layers=counts[tower],
                    kind=kind,
                    causal=causal,
                    num_heads=int(num_heads),
                    num_kv_heads=int(num_kv_heads),
                    head_dim=int(head_dim),
                    heads=heads,
                    parts=parts,
                )
            )
        return sites

    def install(self, site: AttentionSite, method) -> None:
        _register_attention_function()
        module = site.module
        original = module.config
        routed = copy.copy(original)
        # set the private field directly: the public setter would also rewrite shared sub-configs
        routed.__dict__["_attn_implementation_internal"] = ATTENTION_NAME
        module.__dict__[ORIGINAL_CONFIG_ATTR] = original
        module.__dict__[METHOD_ATTR] = method
        module.config = routed
        hooks = [module.register_forward_pre_hook(_count_calls, with_kwargs=True),
                 module.register_forward_hook(_check_called, with_kwargs=True)]
        if _keeps_state(site, method):
            hooks.append(module.register_forward_pre_hook(_capture_cache, with_kwargs=True))
            hooks.append(module.register_forward_hook(_release_cache, with_kwargs=True, always_call=True))
        module.__dict__[HOOKS_ATTR] = hooks

    def watch_model(self, model: nn.Module, placements) -> object:
        """Check after every forward of `model` that each cache-keeping module that ran found the
        cache the model returned: a transformers release that hides it from attention modules then
        fails loudly instead of running every KV / state method dense."""
        watched = [site.module for site, method in placements if _keeps_state(site, method)]

        def before(root, args, kwargs):
            if kwargs.get("output_attentions") or getattr(root.config, "output_attentions", False):
                warn_once("output_attentions", "output_attentions=True: attnpatch's patched attention modules return no "
                          "attention weights, so the model's attentions leave them out (an empty tuple when every "
                          "layer is patched); attnpatch.inspect_sinks and exact_attention_weights measure them")
            for module in watched:
                module.__dict__.pop(SAW_CACHE_ATTR, None)

        def after(root, args, kwargs, output):
            cache = _output_cache(output)
            blind = [m for m in watched if m.__dict__.get(SAW_CACHE_ATTR) is False]
            if cache is not None and blind:
                import transformers

                name = blind[0].__dict__[METHOD_ATTR].name
                raise PatchError(
                    f"{name}: {type(model).__name__} returned a {type(cache).__name__}, but {len(blind)} patched "
                    f"attention module(s) never received it (transformers {transformers.__version__} passes the "
                    "cache in a way attnpatch does not know); the method would have run without its cache. "
                    "Pin a transformers version in the range the README states."
                )

        hooks = [model.register_forward_pre_hook(before, with_kwargs=True),
                 model.register_forward_hook(after, with_kwargs=True)]
        return lambda: [hook.remove() for hook in hooks]

    def uninstall(self, site: AttentionSite) -> None:
        module = site.module
        for hook in module.__dict__.pop(HOOKS_ATTR, []):
            hook.remove()
        original = module.__dict__.pop(ORIGINAL_CONFIG_ATTR, None)
        if original is not None:
            module.config = original
        module.__dict__.pop(METHOD_ATTR, None)
        module.__dict__.pop(CACHE_ATTR, None)
        module.__dict__.pop(SAW_CACHE_ATTR, None)
        module.__dict__.pop(CALLS_ATTR, None)

