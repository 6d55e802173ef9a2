"""attnpatch: one-call, reversible attention patching for Hugging Face models.

    from attnpatch import patch_model, unpatch_model
    patch_model(model, "linear", feature_map="hedgehog")
    unpatch_model(model)   # outputs identical, bit for bit, to before patching
"""

from .api import (
    is_patched,
    load_patched,
    patch_model,
    patched_configs,
    patched_methods,
    save_patched,
    trainable_parameters,
    unpatch_model,
)
from .cache import cache_nbytes
from .calibration import SparseCalibration, calibrate_block_topk
from .config import PatchConfig
from .errors import PatchError, UnsupportedModelError
from .registry import Method, MethodInfo, ParamSpec, list_methods, register_method

__version__ = "0.1.0"

__all__ = [
    "Method",
    "MethodInfo",
    "ParamSpec",
    "PatchConfig",
    "PatchError",
    "SparseCalibration",
    "UnsupportedModelError",
    "cache_nbytes",
    "calibrate_block_topk",
    "is_patched",
    "list_methods",
    "load_patched",
    "patch_model",
    "patched_configs",
    "patched_methods",
    "register_method",
    "save_patched",
    "trainable_parameters",
    "unpatch_model",
]
