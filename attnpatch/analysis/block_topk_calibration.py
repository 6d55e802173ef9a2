"""Per-head sparse budgets chosen on calibration data (the MoA / HeSS idea: heads differ in how
concentrated their attention is, so each gets the budget it needs).

`calibrate_block_topk` runs the model densely on a few batches; at every layer it measures, per kv
head, the attention recall of block top-k at each budget (the softmax mass the kept blocks hold,
averaged over queries), then picks `head_top_k` per head: the smallest budget whose mean recall
reaches a target, or, for a given mean budget, the allocation that maximises the summed recall.
The result is a PatchConfig with per-layer `head_top_k`, so `patch_model`, `save_patched` and
`load_patched` carry the budgets. Calibrate at the sequence length you will run: a longer context
spreads attention over more blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..api import patch_model, patched_methods, unpatch_model
from ..config import PatchConfig
from ..errors import PatchError


@dataclass
class RecallRecorder:
    """Sums of block top-k recall curves over the calls of one layer (see block_topk_recall)."""

    recall: torch.Tensor | None = None  # (Hkv, K + 1)
    rows: torch.Tensor | None = None  # (Hkv,)

    def add(self, recall: torch.Tensor, rows: torch.Tensor) -> None:
        recall, rows = recall.cpu(), rows.cpu()
        if self.recall is None:
            self.recall, self.rows = recall, rows
            return
        width = max(self.recall.shape[-1], recall.shape[-1])  # budgets past a call's blocks keep everything
        self.recall = _extend(self.recall, width) + _extend(recall, width)
        self.rows = self.rows + rows

    def mean(self) -> torch.Tensor:
        return self.recall / self.rows.clamp_min(1)[:, None]


def _extend(curve: torch.Tensor, width: int) -> torch.Tensor:
    """Pad a (H, K+1) recall-sum curve to `width` budgets: beyond its last block it keeps everything."""
    if curve.shape[-1] == width:
        return curve
    return torch.cat([curve, curve[:, -1:].expand(-1, width - curve.shape[-1])], dim=-1)


@dataclass
class SparseCalibration:
    """What `calibrate_block_topk` found: the recall curves (curves[layer][h, k] = mean recall of kv
    head h with top_k=k), the chosen budgets per layer and kv head with the recall they reach, and
    the config to patch with. `choose(recall=... | mean_top_k=...)` picks budgets again from the
    same curves, without rerunning the model."""

    curves: dict[int, torch.Tensor]
    fixed_params: dict
    towers: list[str] | None = None
    recall: float | None = None  # the recall target, or None when chosen by mean_top_k
    mean_top_k: float | None = None
    budgets: dict[int, list[int]] = field(default_factory=dict)
    achieved: dict[int, list[float]] = field(default_factory=dict)
    config: PatchConfig | None = None

    def choose(self, *, recall: float | None = None, mean_top_k: float | None = None) -> SparseCalibration:
        """Budgets from the curves: with `recall`, each head's smallest budget reaching it; with
        `mean_top_k`, at most that many blocks per head on average, spent where they add the most
        recall summed over all heads of all layers."""
        _check_choice(recall, mean_top_k)
        if mean_top_k is not None:
            chosen = _allocate(self.curves, mean_top_k)
        else:
            chosen = {}
            for layer, curve in self.curves.items():
                reaches = curve >= recall - 1e-6
                # the smallest budget reaching the target (the largest if none does: keep everything)
                chosen[layer] = torch.where(reaches.any(-1), reaches.float().argmax(-1), curve.shape[-1] - 1)
        budgets = {layer: b.tolist() for layer, b in sorted(chosen.items())}
        achieved = {layer: self.curves[layer].gather(-1, b[:, None])[:, 0].tolist() for layer, b in chosen.items()}
        params = {**self.fixed_params, "top_k": max(max(b) for b in budgets.values())}
        config = PatchConfig("block_topk", params, layer_params={layer: {"head_top_k": b} for layer, b in budgets.items()},
                             towers=self.towers).validated()
        return SparseCalibration(self.curves, self.fixed_params, self.towers, None if mean_top_k is not None else recall,
                                 mean_top_k, budgets, achieved, config)

    def mean_budget(self) -> float:
        flat = [b for budgets in self.budgets.values() for b in budgets]
        return sum(flat) / len(flat)

    def table(self) -> str:
        """Markdown table: one row per layer, `budget (recall)` per kv head."""
        heads = len(next(iter(self.budgets.values())))
        lines = ["| layer | " + " | ".join(f"kv head {h}" for h in range(heads)) + " |",
                 "|---|" + "---|" * heads]
        for layer, budgets in sorted(self.budgets.items()):
            cells = [f"{k} ({r:.3f})" for k, r in zip(budgets, self.achieved[layer])]
            lines.append(f"| {layer} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


def _check_choice(recall: float | None, mean_top_k: float | None) -> None:
    if mean_top_k is not None:
        if mean_top_k < 0:
            raise PatchError(f"mean_top_k must be >= 0 blocks per head, got {mean_top_k}")
    elif recall is None or not 0.0 < recall <= 1.0:
        raise PatchError(f"recall must be in (0, 1] (or pass mean_top_k), got {recall}")


def _allocate(curves: dict[int, torch.Tensor], mean_top_k: float) -> dict[int, torch.Tensor]:
    """Budgets with mean `mean_top_k` over all heads that maximise the summed recall: each head
    takes argmax_k recall(k) - lam * k, with lam the smallest price whose total fits the budget
    (bisection; the total falls as lam rises)."""
    total = mean_top_k * sum(c.shape[0] for c in curves.values())

    def choose(lam: float) -> dict[int, torch.Tensor]:
        return {layer: (c - lam * torch.arange(c.shape[-1])).argmax(-1) for layer, c in curves.items()}

    low, high = 0.0, 1.0  # at lam = 1 no block is worth its price (a block adds at most 1 to recall)
    for _ in range(60):
        mid = (low + high) / 2
        if sum(int(b.sum()) for b in choose(mid).values()) > total:
            low = mid
        else:
            high = mid
    return choose(high)


def calibrate_block_topk(model, batches, *, recall: float | None = 0.95, mean_top_k: float | None = None,
                         block_size: int = 64, pooling: str = "mean", query_pooling: str = "max", sink_blocks: int = 1,
                         local_blocks: int = 1, towers=None, progress: bool = True) -> SparseCalibration:
    """Per-layer, per-kv-head block top-k budgets from the attention recall measured on `batches`.

    Two ways to choose: `recall` gives every head the smallest budget whose mean recall reaches
    the target; `mean_top_k` (which then takes precedence) spends that many blocks per head on
    average where they add the most recall, summed over all heads of all layers.
    batches: an iterable of model keyword dicts (input_ids, attention_mask, pixel_values...) or of
    input_ids tensors. The model runs densely (each layer's output is exact), so later layers are
    measured on the activations they will really see with dense earlier layers."""
    _check_choice(recall, mean_top_k)  # before the model runs
    fixed = dict(block_size=block_size, pooling=pooling, query_pooling=query_pooling, sink_blocks=sink_blocks,
                 local_blocks=local_blocks)
    patch_model(model, "block_topk", towers=towers, **fixed)
    try:
        methods = patched_methods(model)
        if len({m.site.tower for m in methods}) > 1:
            raise PatchError("calibrate_block_topk calibrates one attention stack; pass towers=[...] to choose it "
                             f"among {sorted({m.site.tower for m in methods})}")
        for method in methods:
            method.recorder = RecallRecorder()
        with torch.no_grad():
            for batch in tqdm(list(batches), desc="calibrating block_topk", disable=not progress):
                model(**batch) if isinstance(batch, dict) else model(input_ids=batch)
        curves = {m.site.layer: m.recorder.mean() for m in methods if m.recorder.recall is not None}
    finally:
        for method in patched_methods(model):
            method.recorder = None
        unpatch_model(model)
    if not curves:
        raise PatchError("no batch reached a sparse prefill: calibration sequences must be longer than block_size")
    return SparseCalibration(curves, fixed, towers).choose(recall=recall, mean_top_k=mean_top_k)
