"""Hooks that wire `token_merge` into a model: per encoder stack, the state reset at each forward
and the merge of every patched layer's output (in a Llava, also the prompt's placeholder runs cut
to the merged image tokens); for a diffusion transformer, the token grid read from its latent."""

from __future__ import annotations

import math

import torch

from ...errors import PatchError
from ..vlm import llava_parts
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


# (the norm in front of an encoder layer's MLP, the MLP's last module): ViT (transformers >= 5.20 and
# before), CLIP / SigLIP, DINOv2-style
MLP_PARTS = (("layernorm_after", "mlp"), ("layernorm_after", "output.dense"), ("layer_norm2", "mlp"),
             ("norm2", "mlp"))


def mlp_parts(layer, label: str):
    """The modules around which ToMe's merge sits, between attention and MLP."""
    for norm, last in MLP_PARTS:
        try:
            return layer.get_submodule(norm), layer.get_submodule(last)
        except AttributeError:
            continue
    raise PatchError(f"token_merge: {label}'s layer has none of the known norm -> MLP layouts "
                     f"({', '.join(f'{n} -> {m}' for n, m in MLP_PARTS)}), so the merge cannot sit between its "
                     "attention and its MLP; pass placement='output' to merge after the whole layer")


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


def _vlm_prompt(model, method):
    """In a Llava, the merged vision tokens are the image features: the prompt's placeholder runs
    shrink to the merged count (visual_token_prune's prompt shortener), measured once with a blank image."""
    try:
        vlm = llava_parts(model, method.name)
    except PatchError:
        return None

    class MergedImagePrompt(_PromptShortener):
        def image_features(self, *args, **kwargs):
            return self.original_features(*args, **kwargs)

    size = vlm.config.vision_config.image_size
    parameter = next(vlm.vision_tower.parameters())
    with torch.no_grad():
        blank = torch.zeros(1, 3, size, size, device=parameter.device, dtype=parameter.dtype)
        features = vlm.get_image_features(pixel_values=blank).pooler_output
    shortener = MergedImagePrompt(model, method)
    extra = 1 if vlm.config.vision_feature_select_strategy == "full" else 0
    shortener.keep = int(features[0].shape[0]) - extra
    return shortener.install()


def wire(model, placements):
    """Install the hooks; returns what removes them."""
    hooks = []
    encoders = [(s, m) for s, m in placements if s.kind != "diffusion"]
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
            if method.config["placement"] == "mlp":
                norm, last = mlp_parts(layer, site.label)
                hooks.append(norm.register_forward_pre_hook(method.merge_mlp_input))
                hooks.append(last.register_forward_hook(method.unmerge_mlp_output))
            # first among the layer's hooks: transformers' hidden-state capture (installed at a model's first
            # forward, perhaps before this patch) must record the merged output
            hooks.append(layer.register_forward_hook(method.merge_layer_output, prepend=True))
    diffusion = [m for s, m in placements if s.kind == "diffusion"]
    if diffusion:
        state = GridState(model)
        hooks.append(model.register_forward_pre_hook(state.record, with_kwargs=True))
        for method in diffusion:
            method.state = state

    undo_prompt = _vlm_prompt(model, encoders[0][1]) if encoders else None

    def undo():
        if undo_prompt is not None:
            undo_prompt()
        for hook in hooks:
            hook.remove()
        for _, method in placements:
            method.state = None

    return undo
