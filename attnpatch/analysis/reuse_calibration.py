"""Choosing `attention_reuse` ranges from the model: how far each attention module's output moves
from one denoising step to the next, measured while the caller generates a few images."""

from __future__ import annotations

import torch

from ..api import patched_methods
from ..errors import PatchError


def _changes(method, record):
    """An around_module that always runs the module and records its step-to-step relative change."""
    previous = {}

    def around(run, args, kwargs):
        out = run(*args, **kwargs)
        steps = method.steps
        key = (steps.generation, method.next_call())
        current = (out[0] if isinstance(out, tuple) else out).detach().float()
        last = previous.get(key)
        if last is not None and last[0] == steps.step - 1 and method.in_window() and last[1].shape == current.shape:
            record.append(float((current - last[1]).norm() / current.norm().clamp_min(1e-12)))
        previous[key] = (steps.step, current)
        return out

    return around


@torch.no_grad()
def calibrate_reuse(model, generate, threshold: float = 0.05, max_reuse: int = 5) -> dict:
    """Run `generate()` (e.g. lambda: pipe(prompts, num_inference_steps=20)) with every
    attention_reuse module of `model` computing each step, and measure each module's mean relative
    change of output between consecutive steps inside its window, c. A module may then reuse an
    output for k steps while k * c <= threshold (at most max_reuse). Returns {"changes": {path: c},
    "layer_params": {layer: {"<kind>_reuse": k}}} to patch with again (per layer: the smallest k
    among that layer's modules of a kind)."""
    methods = [m for m in patched_methods(model) if m.name == "attention_reuse"]
    if not methods:
        raise PatchError("calibrate_reuse needs a model patched with attention_reuse (include_cross_attention=True "
                         "to calibrate the cross-attention too)")
    records = {m.site.path: [] for m in methods}
    for method in methods:
        method.around_module = _changes(method, records[method.site.path])
    try:
        generate()
    finally:
        for method in methods:
            del method.around_module  # back to the class's
            method.saved, method.step_seen = {}, None
    empty = [path for path, found in records.items() if not found]
    if empty:
        raise PatchError(f"calibrate_reuse measured no step-to-step change for {empty[:3]}: generate at least two "
                         "steps with timesteps inside the reuse window")
    changes = {path: sum(found) / len(found) for path, found in records.items()}
    layer_params: dict[int, dict[str, int]] = {}
    for method in methods:
        change = changes[method.site.path]
        steps = max_reuse if change <= 0 else min(max_reuse, int(threshold / change))
        chosen = layer_params.setdefault(method.site.layer, {})
        name = f"{method.kind}_reuse"
        chosen[name] = min(chosen.get(name, steps), steps)
    return {"changes": changes, "layer_params": layer_params}
