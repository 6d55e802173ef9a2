"""`visual_token_prune` (FasterVLM / FoPru) for Llava-style VLMs: the vision tower's [CLS] attention
in the layer whose output feeds the projector (vision_feature_layer, the penultimate layer for
LLaVA-1.5), averaged over heads, ranks the image tokens; only a `ratio` of them reaches the
projector and the language model, in their original order. mode="rank" keeps the best tokens,
mode="row" the patch-grid rows with the best mean score (keeps rows whole).

The language model's inputs stay consistent: each image's run of placeholder tokens in input_ids is
shortened to the kept count, and attention_mask, position_ids, labels and cache_position lose the
same columns (positions of later tokens close up). `generate` shortens the prompt first, so the
sequences it returns carry the shortened prompt.
"""

from __future__ import annotations

import functools

import torch

from ...errors import PatchError
from ...ops.attention_weights import attention_weights
from ...runtime.exact import exact_attention, visible_keys
from ..base import Method, Paper, ParamSpec
from ..wiring import model_parts, named_inputs, sites_within

MODES = ("rank", "row")


def kept_count(tokens: int, ratio: float, mode: str, grid: int) -> int:
    """How many of an image's `tokens` patch tokens survive (at least one, or one grid row)."""
    if mode == "row":
        return max(1, round(ratio * grid)) * (tokens // grid)
    return max(1, round(ratio * tokens))


def keep_indices(scores: torch.Tensor, ratio: float, mode: str = "rank") -> torch.Tensor:
    """(images, tokens) scores -> (images, kept) indices in ascending (original) order."""
    tokens = scores.shape[-1]
    grid = int(round(tokens ** 0.5))
    if mode == "row":
        if grid * grid != tokens:
            raise PatchError(f"mode='row' needs a square patch grid; this image has {tokens} tokens")
        rows = kept_count(tokens, ratio, "row", grid) // grid
        best = scores.unflatten(-1, (grid, grid)).mean(-1).topk(rows, dim=-1).indices.sort(dim=-1).values
        return (best[..., None] * grid + torch.arange(grid, device=scores.device)).flatten(-2)
    keep = kept_count(tokens, ratio, "rank", grid)
    return scores.topk(keep, dim=-1).indices.sort(dim=-1).values


def shorten_placeholders(input_ids: torch.Tensor, image_token_id: int, per_image: int, keep: int) -> torch.Tensor:
    """(B, L) bool columns to keep: each run of `per_image` placeholders loses its last
    per_image - keep. Every sequence must lose the same number (same number of images)."""
    placeholder = input_ids == image_token_id
    counts = placeholder.sum(-1)
    if bool((counts % per_image).any()):
        raise PatchError(f"each image needs {per_image} placeholder tokens (id {image_token_id}); found "
                         f"{counts.tolist()} per sequence")
    if bool((counts != counts[0]).any()):
        raise PatchError(f"visual_token_prune shortens every sequence by the same amount, so every sequence needs the "
                         f"same number of images; placeholder counts per sequence: {counts.tolist()}")
    rank = placeholder.long().cumsum(-1) - 1  # index of each placeholder within its sequence
    drop = placeholder & (rank % per_image >= keep)
    return ~drop


def drop_columns(value: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """(..., B, L) -> (..., B, kept): the kept `columns` (B, L) of every row (same count per row)."""
    width = int(columns[0].sum())
    return value[..., columns.to(value.device).expand(value.shape)].view(*value.shape[:-1], width)


class VisualTokenPrune(Method):
    name = "visual_token_prune"
    paper = Paper('[CLS] Attention is All You Need for Training-Free Visual Token Pruning (FasterVLM)', 2024, "https://arxiv.org/abs/2412.01818")
    deviations = ()
    family = "tokens"
    summary = ("FasterVLM / FoPru for Llava-style VLMs: rank image tokens by the vision tower's [CLS] attention at the "
               "feature layer and pass only a ratio of them (by rank or by grid row, in order) to the language model.")
    model_kinds = ("encoder",)
    interventions = frozenset({"attention", "tokens"})
    params = (
        ParamSpec("ratio", float, 0.25, "fraction of each image's tokens kept (1 = all)", low=0.0, high=1.0,
                  low_open=True),
        ParamSpec("mode", str, "rank", "rank: the best tokens; row: the patch-grid rows with the best mean score",
                  choices=MODES),
    )

    def __init__(self, site, **params):
        super().__init__(site, **params)
        self.capture = False
        self.scores = None  # (images, patches) [CLS] attention while the image features are computed

    @classmethod
    def default_sites(cls, model, sites):
        vlm = model_parts(sites, cls.name).vision_language(cls.name)
        layer = vlm.feature_layer
        if not isinstance(layer, int):
            raise PatchError(f"visual_token_prune scores tokens at one vision layer; this model concatenates layers "
                             f"{layer} (vision_feature_layer)")
        tower = sites_within(sites, vlm.vision_encoder)
        if not tower:
            raise PatchError("visual_token_prune found no attention module in the vision tower")
        depth = tower[0].num_layers
        # hidden_states[i] is the output of layer i - 1, so feature layer f comes from layer (f mod depth+1) - 1
        index = layer % (depth + 1) - 1
        if index < 0:
            raise PatchError(f"vision_feature_layer={layer} selects the embeddings, which have no [CLS] attention")
        return [s for s in tower if s.layer == index]

    def check_site(self, site) -> None:
        if site.causal:
            raise PatchError(f"visual_token_prune reads [CLS] attention in a vision encoder; {site.label} is causal")

    def attention(self, call):
        if self.capture:
            allowed = visible_keys(call)
            weights = attention_weights(call.query[:, :, :1], call.key, None if allowed is None else allowed[..., :1, :],
                                        call.scaling, call.softcap)
            self.scores = weights.mean(dim=1)[:, 0, 1:]  # [CLS] row, mean over heads, patch keys
        return exact_attention(call)

    @classmethod
    def finish_patch(cls, model, adapter, placements):
        if len(placements) != 1:
            raise PatchError("visual_token_prune scores tokens at one vision layer; leave towers and layers unset (it "
                             "picks the feature layer) or select exactly one layer of the vision tower")
        (site, method), = placements
        vlm = model_parts([site], cls.name).vision_language(cls.name)
        if "generate" in model.__dict__ or vlm.image_features_replaced():
            raise PatchError("visual_token_prune is already applied to this model (or generate was replaced); unpatch first")
        return _PromptShortener(model, vlm, method).install()


class _PromptShortener:
    """Wires visual_token_prune into a Llava: the image features keep only the top tokens, and each
    image's run of placeholder tokens in the prompt (ids, masks, labels, positions) is cut to match,
    in the outermost forward (which holds the labels) and in generate."""

    def __init__(self, model, vlm, method: VisualTokenPrune):
        self.owner, self.vlm, self.method = model, vlm, method
        grid = vlm.image_size // vlm.vision_patch
        self.patches = grid * grid
        self.keep = kept_count(self.patches, method.config["ratio"], method.config["mode"], grid)
        self.inputs_of = named_inputs(model.forward)
        self.original_features = vlm.image_feature_function()  # the class's bound method (or an earlier wrapper)
        self.bound_generate = getattr(model, "generate", None)

    def install(self):
        """Wrap get_image_features and generate, hook the forward; returns what undoes it all."""
        self.vlm.replace_image_features(_wrapping(self.original_features, self.image_features))
        hook = self.owner.register_forward_pre_hook(self.shorten_forward, with_kwargs=True)
        if self.bound_generate is not None:
            self.owner.generate = _wrapping(self.bound_generate, self.generate)

        def undo():
            hook.remove()
            self.owner.__dict__.pop("generate", None)
            self.vlm.restore_image_features()

        return undo

    def features_per_image(self, forward_inputs: dict) -> tuple[int, int]:
        """Placeholder tokens per image before and after pruning ("full" keeps the [CLS] feature too)."""
        extra = 1 if self.vlm.select_strategy(forward_inputs) == "full" else 0
        return self.patches + extra, self.keep + extra

    def image_features(self, *args, **kwargs):
        method = self.method
        method.capture = True
        try:
            image = self.original_features(*args, **kwargs)
        finally:
            method.capture = False
        scores, method.scores = method.scores, None
        if kwargs.get("image_sizes") is not None:
            raise PatchError("visual_token_prune supports fixed-size images (Llava); image_sizes was given")
        order = keep_indices(scores, method.config["ratio"], method.config["mode"])
        features = image.pooler_output if isinstance(image.pooler_output, (list, tuple)) else list(image.pooler_output)
        if features and features[0].shape[0] == scores.shape[-1] + 1:  # "full": the [CLS] feature stays first
            order = torch.cat([order.new_zeros(order.shape[0], 1), order + 1], dim=-1)
        image.pooler_output = [f[i.to(f.device)] for f, i in zip(features, order)]
        return image

    def shortened(self, kwargs, images: int):
        """kwargs with each image's placeholder run cut to the kept count (ids, masks, labels,
        positions), or None when the runs already have the kept count."""
        ids = kwargs.get("input_ids")
        if ids is None:
            raise PatchError("visual_token_prune needs input_ids (it shortens each image's placeholder run)")
        full, kept = self.features_per_image(kwargs)
        image_token = self.vlm.image_placeholder
        per_image = int((ids == image_token).sum()) // max(1, images)
        if per_image == kept:
            return None  # already shortened (generate, or inputs prepared by the caller)
        if per_image != full:
            raise PatchError(f"each image needs {full} placeholder tokens ({kept} after pruning); found {per_image}")
        columns = shorten_placeholders(ids, image_token, full, kept)
        for name in ("input_ids", "attention_mask", "labels", "position_ids"):
            value = kwargs.get(name)
            if isinstance(value, torch.Tensor) and value.shape[-1] == ids.shape[-1]:
                kwargs[name] = drop_columns(value, columns)
        if isinstance(kwargs.get("cache_position"), torch.Tensor):
            kwargs["cache_position"] = kwargs["cache_position"][:int(columns[0].sum())]
        return kwargs

    def shorten_forward(self, module, args, kwargs):
        kwargs = self.inputs_of(args, kwargs)
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        if kwargs.get("pixel_values") is not None:
            images = kwargs["pixel_values"].shape[0]
        elif encoded is not None:
            images = len(encoded.pooler_output)
        else:
            return None  # text only, or a decoding step
        kwargs = self.shortened(kwargs, images)
        return None if kwargs is None else ((), kwargs)

    def generate(self, *args, **kwargs):
        if args:
            kwargs["input_ids"], args = args[0], args[1:]
        if kwargs.get("pixel_values") is not None and kwargs.get("input_ids") is not None:
            kwargs = self.shortened(kwargs, kwargs["pixel_values"].shape[0]) or kwargs
        return self.bound_generate(*args, **kwargs)


def _wrapping(original, replacement):
    """A plain function calling `replacement` that carries `original`'s name and docstring."""
    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        return replacement(*args, **kwargs)
    return wrapper
