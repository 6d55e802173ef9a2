"""What 2-D methods share: the tokens seen as a patch grid (ViT, CLIP vision, DiT)."""

from __future__ import annotations

from ...errors import PatchError
from ...ops.grid2d import PatchGrid
from ...runtime.exact import exact_attention
from ..base import Method, ParamSpec


class GridMethod(Method):
    """Base of the methods that see the tokens as a 2-D patch grid (ViT, CLIP vision, DiT). Self-
    attention only: cross-attention (DiT text conditioning) stays exact."""

    family = "sparse"
    model_kinds = ("encoder", "diffusion")
    grid_params = (
        ParamSpec("grid", list, None, "[height, width] of the patch grid (default: the largest square that fits "
                  "the sequence, the rest being global tokens)", low=1, optional=True),
        ParamSpec("globals_at", str, "auto", "where the global tokens (CLS, registers, a joint model's text) sit: "
                  "'start', 'end', or 'auto' (start for ViT/CLIP, end for diffusers models, whose joint "
                  "attention appends the text)", choices=("auto", "start", "end")),
    )

    def patch_grid(self, call) -> PatchGrid:
        at = self.config["globals_at"]
        first = self.site.kind != "diffusion" if at == "auto" else at == "start"
        return PatchGrid.infer(call.query.shape[-2], self.config["grid"], first)

    def attention(self, call):
        # text towers (causal) and cross-attention have no patch grid: they stay exact
        if call.causal or self.site.cross or call.query.shape[-2] != call.key.shape[-2]:
            return exact_attention(call)
        return self.grid_attention(call, self.patch_grid(call))

    def grid_attention(self, call, patch_grid: PatchGrid):
        raise NotImplementedError

    def check_site(self, site) -> None:
        if self.config.get("grid") is not None and len(self.config["grid"]) != 2:
            raise PatchError(f"{self.name}: grid must be [height, width] in patches, got {self.config['grid']}")
