"""Helpers for methods that wire hooks into a model: the model's parts (asked of the adapter through
the sites, adapters/parts.py), the sites inside a module, and a forward's inputs by name."""

from __future__ import annotations

import inspect

from ..errors import PatchError


def model_parts(sites, method: str):
    """What the adapter knows of the whole model (ModelParts), from the sites it made."""
    parts = next((s.parts for s in sites if getattr(s, "parts", None) is not None), None)
    if parts is None:
        raise PatchError(f"{method} needs to know the model's parts, and its adapter gave none "
                         "(a model library attnpatch routes only attention for)")
    return parts


def sites_within(sites, module) -> list:
    """The self-attention sites inside `module` (e.g. a VLM's vision tower or language model)."""
    inside = set(module.modules())
    return [s for s in sites if s.module in inside and not s.cross]


def named_inputs(forward):
    """A function turning a call's (args, kwargs) into one dict of `forward`'s named inputs (for
    forward pre-hooks, which see positional inputs apart)."""
    names = list(inspect.signature(forward).parameters)
    return lambda args, kwargs: {**dict(zip(names, args)), **kwargs}
