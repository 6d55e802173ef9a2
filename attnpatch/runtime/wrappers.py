"""Models inside wrappers: a peft PeftModel (anything with `get_base_model`) holds the transformers model
that attnpatch patches and whose forward takes the cache."""

from __future__ import annotations

from torch import nn


def base_model(model: nn.Module) -> nn.Module:
    """The model a wrapper holds (a peft PeftModel's base model), or the model itself."""
    while callable(getattr(model, "get_base_model", None)) and model.get_base_model() is not model:
        model = model.get_base_model()
    return model
