"""Starting kv compression from the model's own activations (`mla`'s latent, `kv_merge`'s pca fusion).

The SVD of a projection treats every input direction alike, but the hidden states of a trained
model are far from isotropic (a few channels carry most of the energy), so the projection's top
singular directions are not the keys' and values' top principal components.
`calibrate_from_activations` runs a few batches through the dense model (exact attention
everywhere and merged heads swapped back for their originals, so every layer sees what the
original model would give it), measures E[x x^T] of each such layer's inputs (with a constant 1
appended, for biases), and has each method start again from it (`initialise`).
"""

from __future__ import annotations

import contextlib

import torch
from tqdm.auto import tqdm

from ..api import patched_methods
from ..errors import PatchError
from ..runtime.modes import exact_attention_everywhere


def _hidden_states(args, kwargs) -> torch.Tensor:
    states = kwargs.get("hidden_states", args[0] if args else None)
    if not isinstance(states, torch.Tensor):
        raise PatchError("calibrate_from_activations found no hidden_states among the attention module's arguments")
    return states


def calibrated_methods(model) -> list:
    """The patched methods that start from activation statistics."""
    return [m for m in patched_methods(model) if getattr(m, "wants_activations", False)]


@torch.no_grad()
def calibrate_from_activations(model, batches, progress: bool = True) -> dict:
    """Restart every method that wants activation statistics (mla; kv_merge with fusion='pca')
    from `batches` (input_ids tensors (B, L) without padding); returns {"tokens", "layers"}."""
    methods = calibrated_methods(model)
    if not methods:
        raise PatchError("calibrate_from_activations needs a model patched with mla or with kv_merge(fusion='pca')")
    sums: dict[int, torch.Tensor] = {}
    tokens = 0

    def measure(index):
        def hook(module, args, kwargs):
            x = _hidden_states(args, kwargs).detach().double().flatten(0, -2)
            x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
            sums[index] = sums.get(index, 0) + x.T @ x
        return hook

    hooks = [m.site.module.register_forward_pre_hook(measure(i), with_kwargs=True) for i, m in enumerate(methods)]
    was_training = model.training
    model.eval()
    try:
        with exact_attention_everywhere(), contextlib.ExitStack() as originals:
            for method in patched_methods(model):
                if hasattr(method, "original_heads"):
                    originals.enter_context(method.original_heads())
            for batch in tqdm(list(batches), desc="activation calibration", disable=not progress):
                batch = batch.to(next(model.parameters()).device)
                model(input_ids=batch, use_cache=False)
                tokens += batch.numel()
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    if not tokens:
        raise PatchError("calibrate_from_activations got no batches")
    for i, method in enumerate(methods):
        method.initialise((sums[i] / tokens).cpu())
    return {"tokens": tokens, "layers": len(methods)}
