"""Per-head sparse budgets chosen on calibration data (the MoA / HeSS idea: heads differ in how
concentrated their attention is, so each gets the budget it needs).

`calibrate_block_topk` runs the model densely on a few batches; at every layer it measures, per kv
head, the attention recall of block top-k at each budget (the softmax mass the kept blocks hold,
averaged over queries) and picks the smallest `head_top_k` whose mean recall reaches the target.
The result is a PatchConfig with per-layer `head_top_k`, so `patch_model`, `save_patched` and
`load_patched` carry the budgets. Calibrate at the sequence length you will run: a longer context
spreads attention over more blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .api import patch_model, patched_methods, unpatch_model
from .config import PatchConfig
from .errors import PatchError


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
        self.recall = _extend(self.recall, width, self.rows) + _extend(recall, width, rows)
        self.rows = self.rows + rows

    def mean(self) -> torch.Tensor:
        return self.recall / self.rows.clamp_min(1)[:, None]


def _extend(curve: torch.Tensor, width: int, rows: torch.Tensor) -> torch.Tensor:
    """Pad a (H, K+1) recall-sum curve to `width` budgets: beyond its last block it keeps everything."""
    if curve.shape[-1] == width:
        return curve
    return torch.cat([curve, curve[:, -1:].expand(-1, width - curve.shape[-1])], dim=-1)


@dataclass
class SparseCalibration:
    """What `calibrate_block_topk` found: the config to patch with, per layer the chosen budget of
    every kv head and the mean recall it reaches, and the full recall curves (recall[layer][h, k])."""

    config: PatchConfig
    target: float
    budgets: dict[int, list[int]] = field(default_factory=dict)
    achieved: dict[int, list[float]] = field(default_factory=dict)
    curves: dict[int, torch.Tensor] = field(default_factory=dict)

    def table(self) -> str:
        """Markdown table: one row per layer, `budget (recall)` per kv head."""
        heads = len(next(iter(self.budgets.values())))
        lines = ["| layer | " + " | ".join(f"kv head {h}" for h in range(heads)) + " |",
                 "|---|" + "---|" * heads]
        for layer, budgets in sorted(self.budgets.items()):
            cells = [f"{k} ({r:.3f})" for k, r in zip(budgets, self.achieved[layer])]
            lines.append(f"| {layer} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


def calibrate_block_topk(model, batches, *, recall: float = 0.95, block_size: int = 64, pooling: str = "mean",
                         sink_blocks: int = 1, local_blocks: int = 1, towers=None,
                         progress: bool = True) -> SparseCalibration:
    """Per-layer, per-kv-head block top-k budgets reaching `recall` of the dense attention mass.

    batches: an iterable of model keyword dicts (input_ids, attention_mask, pixel_values...) or of
    input_ids tensors. The model runs densely (each layer's output is exact), so later layers are
    measured on the activations they will really see with dense earlier layers."""
    if not 0.0 < recall <= 1.0:
        raise PatchError(f"recall must be in (0, 1], got {recall}")
    fixed = dict(block_size=block_size, pooling=pooling, sink_blocks=sink_blocks, local_blocks=local_blocks)
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
    result = SparseCalibration(PatchConfig("block_topk", dict(fixed), towers=towers), recall)
    for layer, curve in sorted(curves.items()):
        reaches = curve >= recall - 1e-6
        # the smallest budget reaching the target (the largest if none does: keep everything)
        budgets = torch.where(reaches.any(-1), reaches.float().argmax(-1), curve.shape[-1] - 1)
        result.budgets[layer] = budgets.tolist()
        result.achieved[layer] = curve.gather(-1, budgets[:, None])[:, 0].tolist()
        result.curves[layer] = curve
    result.config.params["top_k"] = max(max(b) for b in result.budgets.values())
    result.config.layer_params = {layer: {"head_top_k": b} for layer, b in result.budgets.items()}
    result.config = result.config.validated()
    return result
