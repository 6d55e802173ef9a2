"""Hooks that wire `token_merge` into a model: per encoder stack, the state reset at each forward
and the merge of every patched layer's output (in a Llava, also the prompt's placeholder runs cut
to the merged image tokens); for a diffusion transformer, the token grid read from its latent."""

from __future__ import annotations

import math

import torch

from ...errors import PatchError
from ..wiring import model_parts
from .visual_token_prune import _PromptShortener


class EncoderState:
    """One encoder stack's forward: the sizes of its current tokens and the merge its running
    layer decided (applied to its MLP's input, and to that layer's output)."""

    def __init__(self, depth: int):
        self.depth = depth  # patched layers in the stack (the default r spreads the merges over them)
        self.sizes = None  # (B, N) tokens each row stands for; None = all 1
        self.initial_tokens = None
        self.pending = None
        self.merges = 0  # merges applied since patching: tests' proof of activity
        self.mlp_merges = 0  # MLPs that ran on the merged tokens (placement="mlp")

    def reset(self, *_):
        self.sizes, self.initial_tokens, self.pending = None, None, None


class GridState:
    """A diffusion transformer's token grid, read from the latent (B, C, H, W) of each forward."""

    def __init__(self, patch: int):
        self.patch = patch
        self.shape = None
        self.merges = 0

    def record(self, module, args, kwargs):
        latent = kwargs.get("hidden_states", args[0] if args else None)
        self.shape = None
        if latent is not None and latent.dim() == 4:
            self.shape = (latent.shape[-2] // self.patch, latent.shape[-1] // self.patch)

    def grid(self, tokens: int, label: str) -> tuple[int, int]:
        if self.shape is not None and self.shape[0] * self.shape[1] == tokens:
            return self.shape
        side = math.isqrt(tokens)
        if side * side == tokens:
            return side, side
        raise PatchError(f"token_merge: {label} has {tokens} image tokens and the model's latent grid "
                         f"{self.shape} does not give them; ToMeSD's destinations need the token grid")


def _vlm_prompt(model, parts, method):
    """In a Llava, the merged vision tokens are the image features: the prompt's placeholder runs
    shrink to the merged count (visual_token_prune's prompt shortener), measured once with a blank image."""
    try:
        vlm = parts.vision_language(method.name)
    except PatchError:
        return None

    class MergedImagePrompt(_PromptShortener):
        def image_features(self, *args, **kwargs):
            return self.original_features(*args, **kwargs)

    size = vlm.image_size
    parameter = next(vlm.vision_encoder.parameters())
    with torch.no_grad():
        blank = torch.zeros(1, 3, size, size, device=parameter.device, dtype=parameter.dtype)
        features = vlm.image_features(pixel_values=blank).pooler_output
    shortener = MergedImagePrompt(model, vlm, method)
    extra = 1 if vlm.feature_select_strategy == "full" else 0
    shortener.keep = int(features[0].shape[0]) - extra
    return shortener.install()


def wire(model, placements):
    """Install the hooks; returns what removes them."""
    hooks = []
    parts = model_parts([site for site, _ in placements], "token_merge")
    encoders = [(s, m) for s, m in placements if s.kind != "diffusion"]
    for tower in sorted({s.tower for s, _ in encoders}):
        in_tower = [(s, m) for s, m in encoders if s.tower == tower]
        state = EncoderState(len(in_tower))
        protected = parts.leading_tokens(tower)
        hooks.append(parts.stack_owner(tower).register_forward_pre_hook(state.reset))
        for site, method in in_tower:
            method.state = state
            if method.config["protected"] is None:
                method.protected = protected
            layer = parts.layer(site)
            if method.config["placement"] == "mlp":
                norm, last = parts.norm_and_mlp(site, "token_merge")
                hooks.append(norm.register_forward_pre_hook(method.merge_mlp_input))
                hooks.append(last.register_forward_hook(method.unmerge_mlp_output))
            # first among the layer's hooks: transformers' hidden-state capture (installed at a model's first
            # forward, perhaps before this patch) must record the merged output
            hooks.append(layer.register_forward_hook(method.merge_layer_output, prepend=True))
    diffusion = [m for s, m in placements if s.kind == "diffusion"]
    if diffusion:
        state = GridState(parts.latent_patch_size())
        hooks.append(model.register_forward_pre_hook(state.record, with_kwargs=True))
        for method in diffusion:
            method.state = state

    undo_prompt = _vlm_prompt(model, parts, encoders[0][1]) if encoders else None

    def undo():
        if undo_prompt is not None:
            undo_prompt()
        for hook in hooks:
            hook.remove()
        for _, method in placements:
            method.state = None

    return undo
