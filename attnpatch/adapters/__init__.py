"""Adapters: one per model library. Method code never names a model family; adapters do no math."""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from .base import SUPPORTED_FAMILIES, Adapter, AttentionSite, HeadAccess
from .hf_diffusers import DiffusersAdapter
from .hf_transformers import TransformersAdapter

ADAPTERS: tuple[Adapter, ...] = (TransformersAdapter(), DiffusersAdapter())


def find_adapter(model: nn.Module) -> tuple[Adapter, list[AttentionSite]]:
    """The adapter for this model and the attention sites it finds; a clear error if none fits."""
    for adapter in ADAPTERS:
        if adapter.applies_to(model):
            sites = adapter.sites(model)
            if sites:
                return adapter, sites
            raise UnsupportedModelError(
                f"{type(model).__name__} is a {adapter.name} model, but none of its modules routes attention "
                f"in a way attnpatch can patch. Supported families: {SUPPORTED_FAMILIES}."
            )
    raise UnsupportedModelError(
        f"{type(model).__name__} is not a transformers PreTrainedModel or a diffusers ModelMixin. "
        f"Supported families: {SUPPORTED_FAMILIES}."
    )


__all__ = ["ADAPTERS", "Adapter", "AttentionSite", "HeadAccess", "SUPPORTED_FAMILIES", "find_adapter"]
