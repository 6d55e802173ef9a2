"""Starting `mla`'s latent from the model's own activations.

The SVD of a projection treats every input direction alike, but the hidden states of a trained
model are far from isotropic (a few channels carry most of the energy), so the projection's top
singular directions are not the keys' and values' top principal components. `calibrate_latent`
runs a few batches through the dense model (exact attention everywhere, so every layer sees what
the original model would give it), measures E[x x^T] of each mla layer's inputs (with a constant 1
appended, for biases), and restarts each layer's factors from the principal components of its keys
and values under that covariance (ops/latent.py).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..api import patched_methods
from ..errors import PatchError
from ..runtime.dispatch import exact_attention_everywhere


def _hidden_states(args, kwargs) -> torch.Tensor:
    states = kwargs.get("hidden_states", args[0] if args else None)
    if not isinstance(states, torch.Tensor):
        raise PatchError("calibrate_latent found no hidden_states among the attention module's arguments")
    return states


@torch.no_grad()
def calibrate_latent(model, batches, progress: bool = True) -> dict:
    """Restart every mla layer's factors from activation statistics of `batches` (input_ids
    tensors (B, L) without padding); returns {"tokens": tokens measured, "layers": layers}."""
    methods = [m for m in patched_methods(model) if m.name == "mla"]
    if not methods:
        raise PatchError("calibrate_latent needs a model patched with mla (patch_model(model, 'mla', rank=...))")
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
        with exact_attention_everywhere():
            for batch in tqdm(list(batches), desc="mla calibration", disable=not progress):
                batch = batch.to(next(model.parameters()).device)
                model(input_ids=batch, use_cache=False)
                tokens += batch.numel()
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    if not tokens:
        raise PatchError("calibrate_latent got no batches")
    for i, method in enumerate(methods):
        method.initialise((sums[i] / tokens).cpu())
    return {"tokens": tokens, "layers": len(methods)}
