"""What a transformers attention class does, read from its source: whether it routes through
`AttentionInterface` (so attnpatch can take its attention over) and how its per-head weights are
reached for head surgery."""

from __future__ import annotations

import inspect
import types

from torch import nn

from .base import HeadAccess

_routes_cache: dict[type, bool] = {}
_head_dim_cache: dict[type, bool] = {}
# per-head counts a module may keep as attributes, read by its forward or attention function
_COUNT_ATTRS = (("num_heads", "heads"), ("num_attention_heads", "heads"), ("num_key_value_heads", "kv_heads"),
                ("num_key_value_groups", "groups"))


def _source_mentions(cls: type, function: str, needles: tuple[str, ...], cache: dict[type, bool]) -> bool:
    """Whether the source of cls.<function> contains any of `needles` (memoised per class)."""
    if cls not in cache:
        sources = []
        for body in _wrapped_bodies(getattr(cls, function)):
            try:
                sources.append(inspect.getsource(body))
            except (OSError, TypeError):
                pass
        cache[cls] = any(needle in source for source in sources for needle in needles)
    return cache[cls]


def _wrapped_bodies(function, depth: int = 6) -> list:
    """The function and the functions it wraps: transformers 5.25 wraps LlamaAttention.__init__ in a
    kernels decorator whose own source says nothing about the model and keeps the original only in a
    closure cell (no __wrapped__), so both the __wrapped__ chain and closure-held functions are read."""
    bodies, todo = [], [function]
    while todo and len(bodies) < depth:
        body = todo.pop(0)
        bodies.append(body)
        inner = [getattr(body, "__wrapped__", None)]
        inner += [cell.cell_contents for cell in (getattr(body, "__closure__", None) or ()) if _cell_filled(cell)]
        todo += [f for f in inner if isinstance(f, types.FunctionType) and f not in bodies]
    return bodies


def _cell_filled(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # an empty cell
        return False
    return True


def _routes_through_interface(cls: type) -> bool:
    """Whether the module's forward picks its attention function from AttentionInterface."""
    return _source_mentions(cls, "forward", ("ALL_ATTENTION_FUNCTIONS",), _routes_cache)


def _reads_config_head_dim(cls: type) -> bool:
    """Whether the module's __init__ sizes its projections from config.head_dim when it is set."""
    return _source_mentions(cls, "__init__", ('config, "head_dim"', "config.head_dim"), _head_dim_cache)


def _head_access(module) -> HeadAccess | None:
    """Separate q/k/v/output projections are sliced per head; fused ones (Phi3 qkv_proj) are not."""
    for out in ("o_proj", "out_proj"):
        if all(isinstance(getattr(module, p, None), nn.Linear) for p in ("q_proj", "k_proj", "v_proj", out)):
            counts = tuple((attr, what) for attr, what in _COUNT_ATTRS if isinstance(getattr(module, attr, None), int))
            return HeadAccess(("q_proj", "k_proj", "v_proj", out), _reads_config_head_dim(type(module)), counts)
    return None
