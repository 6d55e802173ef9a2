"""What methods may ask of a model beyond its attention sites, answered by the adapter that knows the
family: a site's `parts` (ModelParts) names each capability, so no method names a model class or an
attribute path. A capability the model lacks raises PatchError naming what was looked for."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import PatchError

# (the norm in front of an encoder layer's MLP, the MLP's last module): ViT (transformers >= 5.20 and
# before), CLIP / SigLIP, DINOv2-style
MLP_PARTS = (("layernorm_after", "mlp"), ("layernorm_after", "output.dense"), ("layer_norm2", "mlp"),
             ("norm2", "mlp"))


@dataclass
class VisionLanguageParts:
    """A Llava-style VLM as its methods see it: towers, the image placeholder and the image-feature
    function they wrap (the module that owns it is `owner`, kept here and nowhere else)."""

    owner: nn.Module
    vision_encoder: nn.Module  # the vision tower
    text_decoder: nn.Module  # the language model
    image_placeholder: int  # the prompt token each image feature replaces
    feature_layer: int | list
    feature_select_strategy: str
    image_size: int
    vision_patch: int  # pixels per image token side
    text_hidden_size: int

    def image_features(self, *args, **kwargs):
        """The VLM's image features (whatever wraps them now)."""
        return self.owner.get_image_features(*args, **kwargs)

    def image_feature_function(self):
        """The callable that computes image features now (the class's bound method, or a wrapper)."""
        return self.owner.get_image_features

    def select_strategy(self, forward_inputs: dict) -> str:
        """The feature selection a forward asks for ("full" keeps the [CLS] feature), else the config's."""
        return forward_inputs.get("vision_feature_select_strategy") or self.feature_select_strategy

    def image_features_replaced(self) -> bool:
        return "get_image_features" in self.owner.__dict__

    def replace_image_features(self, function) -> None:
        """Install `function` as this model's image features (on the instance; `restore_image_features` undoes it)."""
        self.owner.get_image_features = function

    def restore_image_features(self) -> None:
        self.owner.__dict__.pop("get_image_features", None)


class ModelParts:
    """A transformers model's parts, by capability."""

    def __init__(self, model: nn.Module):
        self.model = model

    def layer(self, site) -> nn.Module:
        """The decoder / encoder layer that holds `site`'s attention module."""
        return self.model.get_submodule(f"{site.tower}.{site.layer}")

    def vision_language(self, method: str) -> VisionLanguageParts:
        for module in (self.model, getattr(self.model, "model", None)):
            if module is not None and hasattr(module, "vision_tower") and hasattr(module, "multi_modal_projector") \
                    and hasattr(module, "get_image_features"):
                config = module.config
                return VisionLanguageParts(
                    owner=module, vision_encoder=module.vision_tower, text_decoder=module.language_model,
                    image_placeholder=config.image_token_id, feature_layer=config.vision_feature_layer,
                    feature_select_strategy=config.vision_feature_select_strategy,
                    image_size=config.vision_config.image_size, vision_patch=config.vision_config.patch_size,
                    text_hidden_size=config.text_config.hidden_size)
        raise PatchError(f"{method} needs a Llava-style VLM (a vision_tower, a multi_modal_projector and "
                         f"get_image_features, e.g. LlavaForConditionalGeneration); got {type(self.model).__name__}")

    def rotary_embedding(self, site, method: str) -> nn.Module:
        """The rotary embedding beside `site`'s stack of layers (its `inv_freq` and forward give the angles)."""
        path = site.tower.rsplit(".", 1)[0] + ".rotary_emb" if "." in site.tower else "rotary_emb"
        try:
            rotary = self.model.get_submodule(path)
        except AttributeError:
            rotary = None
        if rotary is None or not hasattr(rotary, "inv_freq"):
            raise PatchError(f"{method} needs the model's rotary embedding, but {site.label} has none at {path}")
        return rotary

    def norm_and_mlp(self, site, method: str) -> tuple[nn.Module, nn.Module]:
        """(the norm in front of the MLP, the MLP's last module) of `site`'s encoder layer."""
        layer = self.layer(site)
        for norm, last in MLP_PARTS:
            try:
                return layer.get_submodule(norm), layer.get_submodule(last)
            except AttributeError:
                continue
        raise PatchError(f"{method}: {site.label}'s layer has none of the known norm -> MLP layouts "
                         f"({', '.join(f'{n} -> {m}' for n, m in MLP_PARTS)}), so nothing can sit between its "
                         "attention and its MLP; pass placement='output' to act after the whole layer")

    def leading_tokens(self, tower: str) -> int:
        """[CLS] plus register tokens that an encoder stack's embeddings put first (0 for SigLIP)."""
        parts = tower.split(".")
        for cut in range(len(parts) - 1, -1, -1):
            owner = self.model.get_submodule(".".join(parts[:cut])) if cut else self.model
            embeddings = getattr(owner, "embeddings", None)
            if embeddings is None:
                continue
            cls = any(hasattr(embeddings, name) for name in ("cls_token", "class_embedding"))
            registers = getattr(embeddings, "register_tokens", None)
            return int(cls) + (0 if registers is None else int(registers.shape[1]))
        return 0

    def stack_owner(self, tower: str) -> nn.Module:
        """The module whose forward runs the stack of layers `tower` (a forward of it is one pass of the stack)."""
        return self.model.get_submodule(tower.rsplit(".", 1)[0]) if "." in tower else self.model

    def latent_patch_size(self) -> int:
        """Pixels of the latent per token side (diffusion transformers; 1 where the model has none)."""
        return getattr(self.model.config, "patch_size", None) or 1
