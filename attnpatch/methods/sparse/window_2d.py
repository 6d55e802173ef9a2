"""window_2d: a 2-D neighbourhood window of tiles."""

from __future__ import annotations

import math

from ...ops.grid2d import neighbourhood_tiles, window_2d_attention
from ..base import Paper, ParamSpec
from .grid import GridMethod


class Window2DAttention(GridMethod):
    name = "window_2d"
    paper = Paper('Neighborhood Attention Transformer', 2022, "https://arxiv.org/abs/2204.07143")
    deviations = ()
    summary = ("2-D neighbourhood window for ViT/DiT: patches grouped in tile x tile tiles; each tile attends the "
               "window_tiles x window_tiles tiles around it (shifted inward at borders) and the global tokens, "
               "which attend everything. Computed block-sparse: only the kept tiles.")
    params = (ParamSpec("tile", int, 4, "side of a tile in patches (queries of a tile share one window)", low=1,
                        high=64),
              ParamSpec("window_tiles", int, 3, "side of the neighbourhood in tiles", low=1),
              *GridMethod.grid_params)
    last_density: float | None = None  # computed / dense query-key pairs among patches, latest call

    def grid_attention(self, call, patch_grid):
        c = self.config
        tiles = neighbourhood_tiles(math.ceil(patch_grid.height / c["tile"]), math.ceil(patch_grid.width / c["tile"]),
                                    c["window_tiles"])
        self.last_density = float(tiles.float().mean())
        return window_2d_attention(call.query, call.key, call.value, patch_grid, tile=c["tile"],
                                   window_tiles=c["window_tiles"], scaling=call.scaling, mask=call.mask,
                                   softcap=call.softcap)
