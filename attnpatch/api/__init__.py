"""The public entry points: patch and unpatch a model (patching.py), save and load it (checkpoints.py),
compress a context once for many questions (contexts.py)."""

from .checkpoints import CONFIG_FILE, PARAMS_FILE, load_patched, save_patched, trainable_parameters
from .contexts import CompressedContext, compress_context
from .patching import (
    compact_heads,
    is_patched,
    patch_model,
    patched_configs,
    patched_methods,
    unpatch_model,
)

__all__ = ["CONFIG_FILE", "CompressedContext", "compress_context", "PARAMS_FILE", "compact_heads", "is_patched", "load_patched", "patch_model",
           "patched_configs", "patched_methods", "save_patched", "trainable_parameters", "unpatch_model"]
