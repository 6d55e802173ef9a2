"""HeadImportance: per-layer, per-head scores from `head_importance`, shown as tables and heat maps
and turned into `prune_heads` configs (per layer or global, query heads or whole kv groups)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..config import PatchConfig
from ..errors import PatchError
from .observing import pick_tower

SCORES = ("gradient", "output_norm", "entropy")
_TITLES = {"gradient": "gradient: E|dL/d gate|", "output_norm": "output norm ||W_o,h o_h||",
           "entropy": "entropy: 1 - H / log n"}
PLAN_SCORES = SCORES + ("random",)


@dataclass
class HeadImportance:
    """scores[score][tower]: (layers, query heads) tensor (NaN where a layer has fewer heads);
    group_size[tower]: query heads per kv head (GQA), for plans that remove whole kv groups."""

    scores: dict[str, dict[str, torch.Tensor]]
    group_size: dict[str, int]
    examples: int
    removed: dict[str, dict[int, list[int]]] = field(default_factory=dict)  # heads masked while scoring

    @property
    def towers(self) -> list[str]:
        return sorted(self.group_size)

    def _tower(self, tower: str | None) -> str:
        return pick_tower(self.towers, tower)

    def table(self, score: str = "gradient", tower: str | None = None, digits: int = 4) -> str:
        """Markdown: one row per layer, one column per query head."""
        values = self._scores(score)[self._tower(tower)]
        header = "| layer | " + " | ".join(f"h{h}" for h in range(values.shape[1])) + " |"
        lines = [header, "|" + "---|" * (values.shape[1] + 1)]
        for layer, row in enumerate(values.tolist()):
            cells = ["" if math.isnan(v) else f"{v:.{digits}g}" for v in row]
            lines.append(f"| {layer} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def plot(self, path, tower: str | None = None):
        """One heat map per score (layers x query heads), saved to `path`."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        tower = self._tower(tower)
        names = [s for s in SCORES if s in self.scores]
        fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names) + 1, 0.22 * len(self.scores[names[0]][tower]) + 2),
                                 squeeze=False)
        for ax, name in zip(axes[0], names):
            image = ax.imshow(self.scores[name][tower].numpy(), aspect="auto", cmap="viridis")
            ax.set_title(_TITLES[name])
            ax.set_xlabel("query head")
            ax.set_ylabel("layer")
            fig.colorbar(image, ax=ax, shrink=0.8)
        fig.suptitle(f"head importance, {tower} ({self.examples} examples)")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    def _scores(self, score: str) -> dict[str, torch.Tensor]:
        if score not in self.scores:
            raise PatchError(f"score {score!r} was not measured; measured: {sorted(self.scores)}")
        return self.scores[score]

    def plan(self, ratio: float, score: str = "gradient", scope: str = "layer", unit: str = "query",
             balanced: bool = False, tower: str | None = None, seed: int = 0) -> PatchConfig:
        """A prune_heads config removing `ratio` of the tower's heads with the lowest `score`.

        scope="layer": the same fraction in every layer; "global": the lowest across all layers
        (scores divided by their layer's L2 norm first, as in Michel et al.), every layer keeping
        at least one unit. unit="query": query heads; "group": whole kv groups (a group's score is
        the sum of its query heads'), which removes kv heads too. balanced=True (scope "layer", unit
        "query") takes the same number of query heads from every kv group, so no group needs zero
        padding and parameters fall by exactly the heads removed. score="random" is the control.
        Heads masked while scoring (greedy mode) stay removed and count towards the ratio."""
        if not 0.0 <= ratio < 1.0:
            raise PatchError(f"ratio is the fraction of heads to remove, in [0, 1); got {ratio}")
        if scope not in ("layer", "global"):
            raise PatchError(f"scope must be 'layer' or 'global', got {scope!r}")
        if unit not in ("query", "group"):
            raise PatchError(f"unit must be 'query' (query heads) or 'group' (whole kv groups), got {unit!r}")
        if score not in PLAN_SCORES:
            raise PatchError(f"unknown score {score!r}; scores: {', '.join(PLAN_SCORES)}")
        if balanced and (scope, unit) != ("layer", "query"):
            raise PatchError("balanced=True takes query heads evenly from each kv group of a layer: it needs "
                             "scope='layer' and unit='query'")
        tower = self._tower(tower)
        reference = next(iter(self.scores.values()))[tower]
        if score == "random":
            generator = torch.Generator().manual_seed(seed)
            values = torch.rand(reference.shape, generator=generator).masked_fill(reference.isnan(), float("nan"))
        else:
            values = self._scores(score)[tower].clone()
        group = self.group_size[tower] if unit == "group" or balanced else 1
        already = self.removed.get(tower, {})
        for layer, heads in already.items():
            values[layer, heads] = -math.inf  # removed before: always among the lowest
        if balanced:  # rank inside each group: every group loses round(ratio * group size) heads
            count = min(round(ratio * group), group - 1)
            order = torch.argsort(torch.nan_to_num(values, nan=math.inf).unflatten(1, (-1, group)), dim=-1)
            offsets = torch.arange(0, values.shape[1], group)[None, :, None]
            lowest = (order[..., :count] + offsets).flatten(1)  # (layers, groups * count)
            return _prune_config({layer: row for layer, row in enumerate(lowest.tolist())
                                  if not reference[layer].isnan().all()}, tower, ratio)
        units = values.unflatten(1, (-1, group)).sum(-1)  # (layers, units)
        if scope == "global" and score != "random":
            norms = torch.nan_to_num(units.masked_fill(units.isinf(), 0.0), nan=0.0).norm(dim=1, keepdim=True)
            units = units / norms.clamp_min(1e-12)
        present = ~units.isnan()
        target = round(ratio * int(present.sum()))
        chosen: dict[int, list[int]] = {}
        if scope == "layer":
            for layer in range(units.shape[0]):
                count = min(round(ratio * int(present[layer].sum())), int(present[layer].sum()) - 1)
                order = torch.argsort(torch.nan_to_num(units[layer], nan=math.inf))[:count].tolist()
                chosen[layer] = order
        else:
            order = torch.argsort(torch.nan_to_num(units, nan=math.inf).flatten()).tolist()
            left = present.sum(dim=1).tolist()
            taken = 0
            for flat in order:
                if taken == target:
                    break
                layer, index = divmod(flat, units.shape[1])
                if not present[layer, index] or left[layer] <= 1:
                    continue
                chosen.setdefault(layer, []).append(index)
                left[layer] -= 1
                taken += 1
        heads = {layer: [h for i in indices for h in range(i * group, (i + 1) * group)]
                 for layer, indices in chosen.items()}
        return _prune_config(heads, tower, ratio)


def _prune_config(heads: dict[int, list[int]], tower: str, ratio: float) -> PatchConfig:
    """The prune_heads config removing heads[layer] in each layer that loses any."""
    layer_params = {layer: {"heads": sorted(h)} for layer, h in sorted(heads.items()) if h}
    if not layer_params:
        raise PatchError(f"ratio={ratio} removes no head of {tower}; raise the ratio")
    return PatchConfig("prune_heads", layers=sorted(layer_params), layer_params=layer_params,
                       towers=[tower]).validated()
