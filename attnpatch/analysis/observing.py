"""What the head-level analyses share (head importance, the sink inspector): selecting the
self-attention sites to watch, running the model with its attention routed through attnpatch so an
observer sees every call, and naming one of several towers in a result."""

from __future__ import annotations

import contextlib

from ..adapters import find_adapter
from ..errors import PatchError
from ..methods.base import INTERVENTIONS_ATTR
from ..runtime.modes import observe_attention


def self_attention_sites(model, towers: list[str] | str | None = None) -> list:
    """The model's self-attention sites, restricted to stacks whose path contains one of `towers`."""
    _, sites = find_adapter(model)
    if isinstance(towers, str):
        towers = [towers]
    sites = [s for s in sites if not s.cross and (towers is None or any(t in s.tower for t in towers))]
    if not sites:
        raise PatchError(f"towers={towers} selects no self-attention stack of this model")
    return sites


@contextlib.contextmanager
def observed(model, sites, observer):
    """Run the block with `observer` seeing every attention call of `sites`: the model's own
    patched attention when every site carries one, else exact softmax patched for the duration."""
    from ..api import patch_model, unpatch_model

    routed = ["attention" in s.module.__dict__.get(INTERVENTIONS_ATTR, {}) for s in sites]
    if any(routed) and not all(routed):
        raise PatchError("some selected attention modules are patched with an attention method and some are not; "
                         "unpatch the model or select towers patched alike")
    patched_here = not any(routed)
    if patched_here:
        patch_model(model, "softmax", towers=sorted({s.tower for s in sites}))
    try:
        with observe_attention(observer):
            yield
    finally:
        if patched_here:
            unpatch_model(model)


def pick_tower(towers: list[str], tower: str | None) -> str:
    """The one tower a result is about: the only one, or the one whose path contains `tower`."""
    if tower is None:
        if len(towers) > 1:
            raise PatchError(f"this model has several attention stacks {towers}; pass tower=<one of them>")
        return towers[0]
    matches = [t for t in towers if tower in t]
    if len(matches) != 1:
        raise PatchError(f"tower={tower!r} matches {matches or 'none'} of {towers}; pass a unique substring")
    return matches[0]


def model_inputs(batch, device) -> dict:
    """A batch as keyword inputs on `device` (a bare tensor is input_ids)."""
    if hasattr(batch, "to") and not isinstance(batch, dict):
        batch = {"input_ids": batch}
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
