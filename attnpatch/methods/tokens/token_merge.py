"""`token_merge`: fewer tokens instead of cheaper attention (ToMe for vision encoders, ToMeSD for
diffusion transformers); ops/token_merge.py has the matching.

Encoders (ViT, CLIP's vision tower, SigLIP, a Llava's vision tower): in every patched
layer the attention's keys (mean over heads) match tokens by bipartite soft matching, and the `r`
most similar sources merge into their destinations (size-weighted mean) between the attention and
the MLP, as in ToMe; later layers attend with proportional attention (log of each key's size added
to its logits), so a merged token weighs as the tokens it stands for. [CLS] and registers are never
merged; the merged sequence keeps the original order, so [CLS] stays first and poolers read it as
before. The layer's own code adds the MLP's output to the unmerged residual, so hooks merge the
MLP's input (at its norm), spread its output back to every token, and merge the layer's output:
merge(x + unmerge(mlp(norm(merge(x))))) = merge(x) + mlp(norm(merge(x))), ToMe's layer exactly,
with the MLP run on the merged tokens. `placement="output"` merges after the whole layer instead
(for layouts without a known norm -> MLP pair; the MLP then pays for r more tokens). In a Llava the
merged tokens at the feature layer are the image features, and each image's run of placeholder
tokens in the prompt is cut to their count (as visual_token_prune does); the language model sees
them without their sizes.

Diffusion transformers (DiT, PixArt, SD3): ToMeSD around each patched self-attention module: its
image tokens merge before it (`ratio` of them; one destination per `stride` x `stride` tile of the
token grid, chosen at random or the tile's first) and its output is unmerged to every token after.
SD3's text tokens travel apart (encoder_hidden_states) and are untouched.
"""

from __future__ import annotations

import math

import torch

from ...errors import PatchError
from ...ops.reference import repeat_kv
from ...ops.token_merge import alternate_destinations, bipartite_merge, grid_destinations
from ...runtime.exact import exact_attention
from ..base import Method, Paper, ParamSpec
from .token_merge_wiring import wire

MODES = ("merge", "prune")


class TokenMerge(Method):
    name = "token_merge"
    paper = Paper('Token Merging: Your ViT But Faster; Token Merging for Fast Stable Diffusion', 2022, "https://arxiv.org/abs/2210.09461")
    deviations = ()
    family = "tokens"
    summary = ("ToMe / ToMeSD: similar tokens merge by bipartite soft matching (encoders: r per layer between attention "
               "and MLP, proportional attention, [CLS] kept; diffusion: a ratio merged around each self-attention and "
               "unmerged after), or are pruned.")
    model_kinds = ("encoder", "diffusion")
    interventions = frozenset({"attention", "tokens"})
    params = (
        ParamSpec("r", int, None, "encoders: tokens merged in each patched layer (per-layer schedule through "
                  "layer_params); unset = half the tokens gone after the last patched layer", low=0, optional=True),
        ParamSpec("ratio", float, 0.5, "diffusion: fraction of the image tokens merged before each self-attention "
                  "(ToMeSD's default 0.5)", low=0.0, high=1.0, high_open=True),
        ParamSpec("mode", str, "merge", "merge: size-weighted mean into the destination; prune: sources dropped",
                  choices=MODES),
        ParamSpec("placement", str, "mlp", "encoders: merge between the attention and the MLP (ToMe) or after the "
                  "whole layer", choices=("mlp", "output")),
        ParamSpec("proportional", bool, True, "encoders: add log(size) of each key to its logits (ToMe)"),
        ParamSpec("protected", int, None, "encoders: leading tokens never merged; unset = [CLS] and registers when "
                  "the embeddings have them", low=0, optional=True),
        ParamSpec("stride", int, 2, "diffusion: side of the grid tiles that each hold one destination", low=1),
        ParamSpec("destinations", str, "random", "diffusion: each tile's destination at random (ToMeSD) or its first "
                  "token", choices=("random", "strided")),
        ParamSpec("seed", int, 0, "diffusion: seed of the random destinations"),
    )

    def __init__(self, site, **params):
        super().__init__(site, **params)
        self.state = None  # EncoderState (encoders) or GridState (diffusion), set by finish_patch
        self.protected = params.get("protected") or 0
        self.generator = torch.Generator().manual_seed(params.get("seed", 0))

    @classmethod
    def default_sites(cls, model, sites):
        usable = [s for s in sites if not s.causal and not s.cross]
        # a dual encoder's text tower (SigLIP's is bidirectional) pools from fixed positions and pads: images only
        images = [s for s in usable if "text_model" not in s.tower.split(".")]
        usable = images or usable
        if not usable:
            raise PatchError("token_merge merges the tokens of bidirectional encoders (ViT, CLIP's vision tower, "
                             "SigLIP) and diffusion transformers; this model has no such self-attention")
        return usable

    def check_site(self, site) -> None:
        if site.causal:
            raise PatchError(f"token_merge merges tokens of bidirectional encoders; {site.label} is causal (a text "
                             "tower or a decoder): patch the vision tower only, e.g. towers=['vision_model.encoder."
                             "layers']")
        if site.cross:
            raise PatchError(f"token_merge merges the queries' own tokens; {site.label} is cross-attention")

    # --- encoders: proportional attention, and the match that the layer's output hook applies
    def layer_r(self) -> int:
        """Tokens this layer merges: `r`, or by default an equal share of half the mergeable tokens."""
        if self.config["r"] is not None:
            return self.config["r"]
        return math.ceil(0.5 * (self.state.initial_tokens - self.protected) / self.state.depth)

    def attention(self, call):
        state = self.state
        if state is None:
            raise PatchError("token_merge was not wired into the model (finish_patch did not run); patch it with "
                             "patch_model")
        if self.site.kind == "diffusion":  # the tokens were merged around the module (around_module)
            return exact_attention(call)
        tokens = call.key.shape[-2]
        if state.initial_tokens is None:
            state.initial_tokens = tokens
        weighted = self.config["proportional"] and self.config["mode"] == "merge"  # pruned tokens all have size 1
        out = self._proportional(call) if state.sizes is not None and weighted else None
        out = exact_attention(call) if out is None else out
        r = self.layer_r()
        if r and call.mask is not None:
            raise PatchError(f"token_merge: {self.site.label} attends under a mask (padding); merging would mix padded "
                             "and real tokens. Merge image tokens (no mask), or pass unpadded inputs")
        if r:
            metric = call.key.mean(dim=1)  # ToMe matches on the keys, averaged over heads
            state.pending = bipartite_merge(metric.float(), r, alternate_destinations(tokens, self.protected),
                                            self.protected)
        return out

    def _proportional(self, call):
        sizes = self.state.sizes
        if sizes.shape[-1] != call.key.shape[-2]:
            raise PatchError(f"token_merge: {self.site.label} got {call.key.shape[-2]} tokens but the stack holds "
                             f"{sizes.shape[-1]}; something between the layers changed the sequence")
        bias = sizes.log().to(call.query.dtype)[:, None, None, :]
        if call.mask is not None:
            bias = bias.masked_fill(~call.mask, float("-inf"))
        groups = call.kv_groups
        return torch.nn.functional.scaled_dot_product_attention(
            call.query, repeat_kv(call.key, groups), repeat_kv(call.value, groups), attn_mask=bias, scale=call.scaling)

    def merge_mlp_input(self, module, args):
        merge = self.state.pending
        if merge is None:
            return None
        merged, _ = merge.merge(args[0], self.state.sizes, self.config["mode"])
        self.state.mlp_merges += 1
        return (merged, *args[1:])

    def unmerge_mlp_output(self, module, args, output):
        merge = self.state.pending
        return None if merge is None else merge.unmerge(output)

    def merge_layer_output(self, module, args, output):
        state = self.state
        merge, state.pending = state.pending, None
        if merge is None:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        merged, state.sizes = merge.merge(hidden, state.sizes, self.config["mode"])
        state.merges += 1
        return (merged, *output[1:]) if isinstance(output, tuple) else merged

    # --- diffusion: merge around the attention module (called by the diffusers adapter)
    def around_module(self, run, args, kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states")
        if hidden is None or hidden.dim() != 3:
            raise PatchError(f"token_merge: {self.site.label} got hidden states of shape "
                             f"{None if hidden is None else tuple(hidden.shape)}; it merges (B, tokens, channels)")
        for name in ("image_rotary_emb", "attention_mask"):
            if kwargs.get(name) is not None:
                raise PatchError(f"token_merge: {self.site.label} received {name}, which is laid out per token; "
                                 "merging would misalign it (rotary or masked models are not supported)")
        height, width = self.state.grid(hidden.shape[1], self.site.label)
        r = int(hidden.shape[1] * self.config["ratio"])
        destinations = grid_destinations(height, width, (self.config["stride"],) * 2, self.generator,
                                         self.config["destinations"] == "random", hidden.device)
        merge = bipartite_merge(hidden.float(), r, destinations)
        merged, _ = merge.merge(hidden, None, self.config["mode"])
        args = (merged, *args[1:]) if args else args
        kwargs = kwargs if args else {**kwargs, "hidden_states": merged}
        out = run(*args, **kwargs)
        self.state.merges += 1
        if isinstance(out, tuple):
            return (merge.unmerge(out[0]), *out[1:])
        return merge.unmerge(out)

    @classmethod
    def finish_patch(cls, model, adapter, placements):
        return wire(model, placements)
