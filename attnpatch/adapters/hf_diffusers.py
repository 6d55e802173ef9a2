"""Adapter for diffusers transformers (DiT, PixArt, SD3) through attention processors.

The patched module's processor is wrapped, not rewritten: the original processor still does the
projections, norms, joint text/image concatenation and output layers, and only its call to
`F.scaled_dot_product_attention` is redirected to the method. The redirection is a context-local
switch read by a thin proxy of `torch.nn.functional` in diffusers' processor module, so unpatched
processors (and other threads) keep calling torch directly.
"""

from __future__ import annotations

import contextvars
import inspect
import types

import torch.nn.functional as F
from torch import nn

from ..errors import PatchError
from ..routing.dispatch import run_method
from ..routing.normalise import normalise_mask
from ..runtime.call import AttentionCall
from .base import Adapter, AttentionSite, split_layer_path, tower_depths
from .parts import ModelParts

_active_method: contextvars.ContextVar = contextvars.ContextVar("attnpatch_diffusers_method", default=None)
_wrapper_classes: dict[type, type] = {}


class _FunctionalProxy(types.ModuleType):
    """Stands in for torch.nn.functional inside diffusers' attention_processor module."""

    def __init__(self):
        super().__init__("attnpatch_functional_proxy")

    def __getattr__(self, name):
        return getattr(F, name)

    @staticmethod
    def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                     **kwargs):
        active = _active_method.get()
        if active is None:
            return F.scaled_dot_product_attention(
                query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kwargs
            )
        module, method = active
        call = AttentionCall(
            module=module,
            query=query,
            key=key,
            value=value,
            mask=normalise_mask(attn_mask, key.shape[-2]),
            causal=bool(is_causal),
            scaling=query.shape[-1] ** -0.5 if scale is None else float(scale),
            dropout=float(dropout_p),
            training=module.training,
        )
        return run_method(method, call)  # (B, H, L, D), the layout SDPA returns


def _install_proxy() -> None:
    from diffusers.models import attention_processor

    if not isinstance(attention_processor.F, _FunctionalProxy):
        attention_processor.F = _FunctionalProxy()


class PatchedProcessor:
    """Wraps a diffusers attention processor; see the module docstring."""

    def __init__(self, original, module: nn.Module, method):
        self.original = original
        self.module = module
        self.method = method

    def __call__(self, attn, *args, **kwargs):
        token = _active_method.set((self.module, self.method))
        calls = self.method.calls
        # methods that act around the whole module: token_merge changes its tokens, attention_reuse may skip it
        around = getattr(self.method, "around_module", None)
        ran = []

        def original(*a, **k):
            ran.append(True)
            return self.original(attn, *a, **k)

        try:
            out = original(*args, **kwargs) if around is None else around(original, args, kwargs)
        finally:
            _active_method.reset(token)
        if ran and self.method.calls == calls:  # the processor attends some other way: the method never ran
            raise PatchError(f"{self.method.name}: {type(self.original).__name__} did not call "
                             "scaled_dot_product_attention through diffusers' attention_processor module, so "
                             "attnpatch could not route it; use a diffusers version in the range the README states")
        return out


def _wrapper_for(processor) -> type:
    """A PatchedProcessor subclass whose __call__ advertises the original's signature: diffusers
    drops call kwargs that the processor's signature does not name."""
    cls = type(processor)
    if cls not in _wrapper_classes:

        def __call__(self, attn, *args, **kwargs):
            return PatchedProcessor.__call__(self, attn, *args, **kwargs)

        __call__.__signature__ = inspect.signature(cls.__call__)
        _wrapper_classes[cls] = type(f"Attnpatch{cls.__name__}", (PatchedProcessor,), {"__call__": __call__})
    return _wrapper_classes[cls]


class DiffusersAdapter(Adapter):
    name = "diffusers"

    def applies_to(self, model: nn.Module) -> bool:
        try:
            from diffusers import ModelMixin
        except ImportError:
            return False
        return isinstance(model, ModelMixin)

    def sites(self, model: nn.Module) -> list[AttentionSite]:
        from diffusers.models.attention_processor import Attention

        found = []
        for path, module in model.named_modules():
            if not isinstance(module, Attention):
                continue
            split = split_layer_path(path)
            if split is None:
                continue
            found.append((path, module, *split))
        counts = tower_depths((tower, layer) for *_, tower, layer in found)
        sites, parts = [], ModelParts(model)
        for path, module, tower, layer in found:
            heads = int(module.heads)
            inner_dim = getattr(module, "inner_dim", None) or module.to_q.out_features
            inner_kv_dim = getattr(module, "inner_kv_dim", None) or inner_dim
            head_dim = inner_dim // heads
            sites.append(
                AttentionSite(
                    path=path,
                    module=module,
                    tower=tower,
                    layer=layer,
                    num_layers=counts[tower],
                    kind="diffusion",
                    causal=False,
                    num_heads=heads,
                    num_kv_heads=inner_kv_dim // head_dim,
                    head_dim=head_dim,
                    cross=bool(getattr(module, "is_cross_attention", False)),
                    joint=getattr(module, "add_q_proj", None) is not None,
                    parts=parts,
                )
            )
        return sites

    def install(self, site: AttentionSite, method) -> None:
        _install_proxy()
        module = site.module
        original = module.processor
        module.__dict__["_attnpatch_original_processor"] = original
        module.set_processor(_wrapper_for(original)(original, module, method))

    def uninstall(self, site: AttentionSite) -> None:
        module = site.module
        original = module.__dict__.pop("_attnpatch_original_processor", None)
        if original is not None:
            module.set_processor(original)

