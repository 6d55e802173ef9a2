"""Where a Llava-style VLM keeps its parts, for the methods that act on one (visual_token_prune, var)."""

from __future__ import annotations

import inspect

from ..errors import PatchError


def llava_parts(model, method: str):
    """The module owning vision_tower + multi_modal_projector (the model or its .model), or PatchError."""
    for module in (model, getattr(model, "model", None)):
        if module is not None and hasattr(module, "vision_tower") and hasattr(module, "multi_modal_projector") \
                and hasattr(module, "get_image_features"):
            return module
    raise PatchError(f"{method} needs a Llava-style VLM (a vision_tower, a multi_modal_projector and "
                     f"get_image_features, e.g. LlavaForConditionalGeneration); got {type(model).__name__}")


def sites_within(sites, module) -> list:
    """The self-attention sites inside `module` (a VLM's vision tower or language model)."""
    inside = set(module.modules())
    return [s for s in sites if s.module in inside and not s.cross]


def named_inputs(forward):
    """A function turning a call's (args, kwargs) into one dict of `forward`'s named inputs (for
    forward pre-hooks, which see positional inputs apart)."""
    names = list(inspect.signature(forward).parameters)
    return lambda args, kwargs: {**dict(zip(names, args)), **kwargs}
