"""PyramidKV: SnapKV with budgets that shrink with depth."""

from __future__ import annotations

import torch

from ..base import Paper, ParamSpec
from .snapkv import SnapKV


class PyramidKV(SnapKV):
    name = "pyramidkv"
    paper = Paper('PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling', 2024, "https://arxiv.org/abs/2406.02069")
    deviations = ()
    summary = ("PyramidKV: SnapKV selection with per-layer budgets decreasing linearly with depth (mean = the "
               "budget; the first layer keeps (1 + spread)x, the last (1 - spread)x).")
    params = SnapKV.params + (
        ParamSpec("spread", float, 0.5, "how much budgets differ between first and last layer", low=0.0, high=1.0,
                  high_open=True),
    )

    def layer_budget(self, real_tokens):
        base = super().layer_budget(real_tokens).float()
        depth = self.site.num_layers
        factor = 1.0 + self.config["spread"] * (1.0 - 2.0 * self.site.layer / max(depth - 1, 1))
        return torch.clamp(torch.round(base * factor).long(), min=1)
