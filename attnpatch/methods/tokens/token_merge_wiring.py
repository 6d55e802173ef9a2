"""Hooks that wire `token_merge` into a model: per encoder stack, the state reset at each forward
and the merge of every patched layer's output; for a diffusion transformer, the token grid read
from its latent input."""

from __future__ import annotations

import math

from ...errors import PatchError


class EncoderState:
    """One encoder stack's forward: the sizes of its current tokens and the merge its running
    layer decided (applied to that layer's output)."""

    def __init__(self, depth: int):
        self.depth = depth  # patched layers in the stack (the default r spreads the merges over them)
        self.sizes = None  # (B, N) tokens each row stands for; None = all 1
        self.initial_tokens = None
        self.pending = None
        self.merges = 0  # merges applied since patching: tests' proof of activity

    def reset(self, *_):
        self.sizes, self.initial_tokens, self.pending = None, None, None


class GridState:
    """A diffusion transformer's token grid, read from the latent (B, C, H, W) of each forward."""

    def __init__(self, model):
        self.patch = getattr(model.config, "patch_size", None) or 1
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


def leading_tokens(model, tower: str) -> int:
    """[CLS] plus register tokens that an encoder stack's embeddings put first (0 for SigLIP)."""
    parts = tower.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        owner = model.get_submodule(".".join(parts[:cut])) if cut else model
        embeddings = getattr(owner, "embeddings", None)
        if embeddings is None:
            continue
        cls = any(hasattr(embeddings, name) for name in ("cls_token", "class_embedding"))
        registers = getattr(embeddings, "register_tokens", None)
        return int(cls) + (0 if registers is None else int(registers.shape[1]))
    return 0


def _reject_vlm(model) -> None:
    for module in (model, getattr(model, "model", None)):
        if module is not None and hasattr(module, "vision_tower") and hasattr(module, "multi_modal_projector"):
            raise PatchError("token_merge in a VLM's vision tower would change how many image features reach the "
                             "language model, which attnpatch does not shorten the prompt for yet; patch the vision "
                             "tower on its own (model.model.vision_tower) to measure it, or use visual_token_prune")


def wire(model, placements):
    """Install the hooks; returns what removes them."""
    hooks = []
    encoders = [(s, m) for s, m in placements if s.kind != "diffusion"]
    if encoders:
        _reject_vlm(model)
    for tower in sorted({s.tower for s, _ in encoders}):
        in_tower = [(s, m) for s, m in encoders if s.tower == tower]
        state = EncoderState(len(in_tower))
        protected = leading_tokens(model, tower)
        owner = model.get_submodule(tower.rsplit(".", 1)[0]) if "." in tower else model
        hooks.append(owner.register_forward_pre_hook(state.reset))
        for site, method in in_tower:
            method.state = state
            if method.config["protected"] is None:
                method.protected = protected
            layer = model.get_submodule(f"{tower}.{site.layer}")
            hooks.append(layer.register_forward_hook(method.merge_layer_output))
    diffusion = [m for s, m in placements if s.kind == "diffusion"]
    if diffusion:
        state = GridState(model)
        hooks.append(model.register_forward_pre_hook(state.record, with_kwargs=True))
        for method in diffusion:
            method.state = state

    def undo():
        for hook in hooks:
            hook.remove()
        for _, method in placements:
            method.state = None

    return undo
