"""`var` (visual attention redistribution, "See What You Are Told", Kang et al. 2025) for Llava-style
VLMs: in the language model, image tokens whose hidden state carries a massive activation in the
sink dimensions are visual sinks; in image-centric heads (most of the image attention already on
non-sink image tokens, share >= rho) a share p of the attention on visual sinks moves to the other
image tokens (ops/sink_calibration.py). Training-free.

The image positions come from input_ids (the image placeholder id) at each prefill; sinks are found
per layer from the layer's input hidden states (the residual stream). Decoding steps keep them.
"""

from __future__ import annotations

import torch

from ...errors import PatchError
from ...ops.sink_recalibration import massive_tokens, visual_sink_redistribution
from ...runtime.cache import find_cache
from ...runtime.exact import exact_attention, visible_keys
from ..base import Method, Paper, ParamSpec
from ..wiring import model_parts, named_inputs, sites_within


def _fit(mask: torch.Tensor, length: int) -> torch.Tensor:
    """A (B, L) key mask grown with False (new decoded tokens) or cut to the last `length` keys."""
    if mask.shape[-1] >= length:
        return mask[:, -length:]
    return torch.cat([mask, mask.new_zeros(mask.shape[0], length - mask.shape[-1])], dim=-1)


class VisualAttentionRedistribution(Method):
    name = "var"
    paper = Paper('See What You Are Told: Visual Attention Sink in Large Multimodal Models', 2025, "https://arxiv.org/abs/2503.03321")
    deviations = ()
    family = "sink-recalibrated"
    summary = ("VAR for Llava-style VLMs: visual sink tokens (massive activation in the sink dimensions) give a share p "
               "of their attention to the other image tokens, in image-centric heads of the language model.")
    model_kinds = ("decoder",)
    params = (
        ParamSpec("p", float, 0.6, "share of the attention on visual sinks that moves to other image tokens",
                  low=0.0, high=1.0),
        ParamSpec("tau", float, 50.0, "a token is a sink when max |h[d]| / median |h| over the sink dimensions exceeds "
                  "tau",
                  low=0.0, low_open=True),
        ParamSpec("rho", float, 0.5, "a head is image-centric when non-sink image tokens get >= rho of its image "
                  "attention", low=0.0, high=1.0),
        ParamSpec("dims", list, None, "the sink dimensions; unset = where the first token's activation is massive",
                  low=0, optional=True),
        ParamSpec("block_size", int, 256, "queries whose weights are formed together", low=1, high=65536),
    )

    def __init__(self, site, **params):
        super().__init__(site, **params)
        self.state: dict = {}  # shared by the layers of one patch: {"image": (B, L) bool or None}
        self.hidden = None  # this layer's input hidden states for the current call
        self.sinks = None  # (B, L) visual sinks of this layer, from the last prefill

    @classmethod
    def default_sites(cls, model, sites):
        vlm = model_parts(sites, "var").vision_language("var")
        language = sites_within(sites, vlm.text_decoder)
        if not language:
            raise PatchError("var found no attention module in the language model")
        return language

    def attention(self, call):
        image = self.state.get("image")
        if image is None:
            return exact_attention(call)
        lk = call.key.shape[-2]
        image = _fit(image.to(call.query.device), lk)
        if self.hidden is not None and self.hidden.shape[-2] == lk:  # a prefill: find this layer's sinks
            self.sinks = massive_tokens(self.hidden, self.config["tau"], self.config["dims"], call.key_valid()) & image
        elif self.sinks is None:
            return exact_attention(call)
        sinks = _fit(self.sinks, lk)
        if not bool(sinks.any()):
            return exact_attention(call)
        c = self.config
        return visual_sink_redistribution(call.query, call.key, call.value, visible_keys(call), call.scaling, image,
                                          sinks, c["p"], c["rho"], call.softcap, c["block_size"])

    @classmethod
    def finish_patch(cls, model, adapter, placements):
        parts = model_parts([site for site, _ in placements], "var")
        vlm = parts.vision_language("var")
        dims = placements[0][1].config["dims"]
        width = vlm.text_hidden_size
        if dims and max(dims) >= width:
            raise PatchError(f"var dims {sorted(d for d in dims if d >= width)} exceed the language model's hidden size "
                             f"{width} (valid: 0..{width - 1})")
        state: dict = {"image": None}
        hooks = []
        for site, method in placements:
            method.state = state
            layer = parts.layer(site)

            def capture(module, args, kwargs, method=method):
                method.hidden = kwargs.get("hidden_states", args[0] if args else None)

            hooks.append(layer.register_forward_pre_hook(capture, with_kwargs=True))
        inputs_of = named_inputs(model.forward)

        def find_images(module, args, kwargs):
            kwargs = inputs_of(args, kwargs)
            ids = kwargs.get("input_ids")
            if ids is None and kwargs.get("pixel_values") is not None:
                raise PatchError("var finds the image tokens in input_ids; this call gave pixel_values without "
                                 "input_ids (inputs_embeds?), so var could not act. Pass input_ids")
            cache = find_cache((), kwargs)
            fresh = cache is None or cache.get_seq_length() == 0
            if ids is not None and bool((ids == vlm.image_placeholder).any()):
                state["image"] = ids == vlm.image_placeholder
            elif fresh:
                state["image"] = None  # a new prompt without images
            return None

        hooks.append(model.register_forward_pre_hook(find_images, with_kwargs=True))

        def undo():
            for hook in hooks:
                hook.remove()
            for _, method in placements:
                method.hidden = method.sinks = None

        return undo
