"""attnpatch: one-call, reversible attention patching for Hugging Face models.

    from attnpatch import patch_model, unpatch_model
    patch_model(model, "linear", feature_map="hedgehog")
    unpatch_model(model)   # outputs identical, bit for bit, to before patching
"""

from .analysis.block_topk_calibration import SparseCalibration, calibrate_block_topk
from .analysis.duo_training import DuoCalibration, train_duo_heads
from .analysis.head_importance import greedy_head_pruning, head_importance
from .analysis.head_plans import HeadImportance
from .analysis.sink_inspector import SinkReport, inspect_sinks
from .api import (
    CompressedContext,
    compact_heads,
    compress_context,
    is_patched,
    load_patched,
    patch_model,
    patched_configs,
    patched_methods,
    save_patched,
    trainable_parameters,
    unpatch_model,
)
from .config import PatchConfig
from .errors import PatchError, UnsupportedModelError
from .methods.base import Method, ParamSpec
from .registry import MethodInfo, list_methods, register_method, unregister_method
from .runtime.cache import cache_kwargs, cache_nbytes

__version__ = "0.1.0"

__all__ = [
    "CompressedContext",
    "compress_context",
    "DuoCalibration",
    "HeadImportance",
    "Method",
    "MethodInfo",
    "ParamSpec",
    "PatchConfig",
    "PatchError",
    "SinkReport",
    "SparseCalibration",
    "UnsupportedModelError",
    "cache_kwargs",
    "cache_nbytes",
    "calibrate_block_topk",
    "compact_heads",
    "greedy_head_pruning",
    "head_importance",
    "inspect_sinks",
    "is_patched",
    "list_methods",
    "load_patched",
    "patch_model",
    "patched_configs",
    "patched_methods",
    "register_method",
    "unregister_method",
    "save_patched",
    "train_duo_heads",
    "trainable_parameters",
    "unpatch_model",
]
