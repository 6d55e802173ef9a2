"""The public entry points: patch and unpatch a model (patching.py), save and load it (checkpoints.py)."""

from .checkpoints import CONFIG_FILE, PARAMS_FILE, load_patched, save_patched, trainable_parameters
from .patching import (
    compact_heads,
    is_patched,
    patch_model,
    patched_configs,
    patched_methods,
    unpatch_model,
)

__all__ = ["CONFIG_FILE", "PARAMS_FILE", "compact_heads", "is_patched", "load_patched", "patch_model",
           "patched_configs", "patched_methods", "save_patched", "trainable_parameters", "unpatch_model"]
