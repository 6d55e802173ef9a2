"""Which attention heads matter, measured on calibration data (the result and the pruning plans
built from it are in head_plans.py).

Three scores per layer and query head, each averaged over the calibration examples:
- gradient ("Are Sixteen Heads Really Better than One?"): every head's output is multiplied by a
  gate xi_h = 1 and I_h = E_x |dL(x)/dxi_h|, the first-order loss change from removing the head;
- output_norm: the mean L2 norm of the head's contribution to the layer output, ||W_o,h o_h||;
- entropy: 1 - the attention entropy of the head's rows divided by log(number of visible keys),
  so focused heads score near 1 and heads that spread attention evenly near 0.
`plan(ratio, ...)` turns a score into a `prune_heads` PatchConfig; `greedy_head_pruning` removes
heads in steps, rescoring with the removed heads masked after each step.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..config import PatchConfig
from ..errors import PatchError
from ..ops.attention_weights import attention_weights
from ..runtime.exact import visible_keys
from .head_plans import SCORES, HeadImportance
from .observing import model_inputs, observed, self_attention_sites


# --- measuring
def _default_loss(model, batch: dict, output) -> torch.Tensor:
    """Per-example losses: next-token cross-entropy for causal LMs (labels or input_ids as
    targets), cross-entropy against the labels (or the model's own prediction) for classifiers,
    the symmetric contrastive loss of matched image-text pairs for CLIP-style models."""
    logits = getattr(output, "logits", None)
    if logits is not None and logits.dim() == 3:
        targets = batch.get("labels", batch.get("input_ids"))
        if targets is None:
            raise PatchError("a causal LM loss needs input_ids (or labels) in the batch")
        shift_logits, shift_targets = logits[:, :-1].float(), targets[:, 1:]
        valid = shift_targets != -100
        if "attention_mask" in batch and "labels" not in batch:
            valid = valid & batch["attention_mask"][:, 1:].bool()
        losses = torch.nn.functional.cross_entropy(shift_logits.transpose(1, 2), shift_targets.clamp_min(0),
                                                   reduction="none")
        return (losses * valid).sum(1) / valid.sum(1).clamp_min(1)
    if logits is not None and logits.dim() == 2:
        targets = batch.get("labels", logits.argmax(-1).detach())
        return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
    per_image = getattr(output, "logits_per_image", None)
    if per_image is not None and per_image.shape[0] == per_image.shape[1]:
        targets = torch.arange(per_image.shape[0], device=per_image.device)
        image = torch.nn.functional.cross_entropy(per_image.float(), targets, reduction="none")
        text = torch.nn.functional.cross_entropy(per_image.float().t(), targets, reduction="none")
        return (image + text) / 2
    raise PatchError(f"no default loss for {type(output).__name__} outputs; pass loss_fn(model, batch, output) -> "
                     "one loss per example")


class _HeadProbe:
    """The observer: gates every head's output and accumulates the per-head statistics."""

    def __init__(self, sites, scores, removed):
        self.sites = {id(site.module): site for site in sites}
        self.scores = scores
        self.masked = {id(site.module): removed.get(site.tower, {}).get(site.layer, []) for site in sites}
        self.sums = {name: {key: 0.0 for key in self.sites} for name in scores}
        self.gates: dict[int, torch.Tensor] = {}
        self.token_valid: torch.Tensor | None = None

    def __call__(self, call, out):
        key = id(call.module)
        site = self.sites.get(key)
        if site is None:
            return out
        rows = self._row_weights(call)
        if "entropy" in self.scores:
            self.sums["entropy"][key] = self.sums["entropy"][key] + self._focus(call, rows)
        if "output_norm" in self.scores:
            with torch.no_grad():
                weight = getattr(site.module, site.heads.projections[3]).weight
                blocks = weight.detach().float().unflatten(1, (-1, site.head_dim))  # (hidden, Hq, D)
                norms = torch.einsum("bhld,ohd->bhlo", out.detach().float(), blocks).norm(dim=-1)
                self.sums["output_norm"][key] = self.sums["output_norm"][key] + (norms * rows).sum(-1).sum(0)
        gate = torch.ones(out.shape[0], out.shape[1], device=out.device, dtype=out.dtype)
        gate[:, self.masked[key]] = 0
        if "gradient" in self.scores:
            gate.requires_grad_(True)
            self.gates[key] = gate
        return out * gate[:, :, None, None]

    def _row_weights(self, call) -> torch.Tensor:
        """(B, 1, Lq) weights averaging over each example's valid query rows."""
        batch, length = call.query.shape[0], call.query.shape[-2]
        valid = torch.ones(batch, length, device=call.query.device)
        if self.token_valid is not None and self.token_valid.shape[-1] == length:
            valid = self.token_valid.to(valid)
        return (valid / valid.sum(-1, keepdim=True).clamp_min(1))[:, None]

    @staticmethod
    @torch.no_grad()
    def _focus(call, rows) -> torch.Tensor:
        allowed = visible_keys(call)
        weights = attention_weights(call.query, call.key, allowed, call.scaling, call.softcap)  # (B, Hq, Lq, Lk)
        entropy = -(weights * torch.log(weights.clamp_min(1e-30))).sum(-1)
        if allowed is None:
            visible = torch.full(weights.shape[:-1], weights.shape[-1], device=weights.device)
        else:
            visible = allowed.expand(*weights.shape).sum(-1).float()
        focus = torch.where(visible > 1, 1 - entropy / torch.log(visible.clamp_min(2)), torch.ones_like(entropy))
        return (focus * rows).sum(-1).sum(0)


def head_importance(model, batches, scores=SCORES, loss_fn=None, towers: list[str] | str | None = None,
                    removed: dict[str, dict[int, list[int]]] | None = None, progress: bool = True) -> HeadImportance:
    """Score every query head on calibration `batches` (dicts of model inputs, or input_ids
    tensors). `loss_fn(model, batch, output) -> (B,) losses` overrides the default loss the
    gradient score differentiates; `removed` masks heads ({tower: {layer: [heads]}}) while scoring.
    The model runs with exact attention routed through attnpatch (patched for the duration if it
    is not patched already); its weights get no gradients."""
    scores = tuple(scores)
    unknown = sorted(set(scores) - set(SCORES))
    if unknown or not scores:
        raise PatchError(f"unknown head scores {unknown or scores}; scores: {', '.join(SCORES)}")
    removed = removed or {}
    sites = self_attention_sites(model, towers)
    missing = [s.path for s in sites if s.heads is None]
    if missing:
        raise PatchError(f"head importance needs separate q/k/v/output projections; {missing[0]} has none")
    probe = _HeadProbe(sites, scores, removed)
    device = next(model.parameters()).device
    loss_fn = loss_fn or _default_loss
    examples = 0
    was_training = model.training
    model.eval()
    try:
        with observed(model, sites, probe):
            for batch in tqdm(list(batches), desc="head importance", disable=not progress):
                batch = model_inputs(batch, device)
                probe.token_valid = batch.get("attention_mask")
                probe.gates = {}
                with torch.set_grad_enabled("gradient" in scores):
                    output = model(**{k: v for k, v in batch.items() if k != "labels"})
                    if "gradient" in scores:
                        losses = loss_fn(model, batch, output)
                        keys = list(probe.gates)
                        grads = torch.autograd.grad(losses.sum(), [probe.gates[k] for k in keys], allow_unused=True)
                        for key, grad in zip(keys, grads):
                            if grad is not None:
                                probe.sums["gradient"][key] = probe.sums["gradient"][key] + grad.abs().sum(0).float()
                examples += next(v for v in batch.values() if isinstance(v, torch.Tensor)).shape[0]
    finally:
        probe.gates = {}
        model.train(was_training)
    if examples == 0:
        raise PatchError("batches is empty; give at least one calibration batch")
    return _collect(probe, sites, examples, removed)


def _collect(probe: _HeadProbe, sites, examples: int, removed) -> HeadImportance:
    by_tower: dict[str, list] = {}
    for site in sites:
        by_tower.setdefault(site.tower, []).append(site)
    result: dict[str, dict[str, torch.Tensor]] = {name: {} for name in probe.scores}
    groups = {}
    for tower, tower_sites in by_tower.items():
        depth = tower_sites[0].num_layers
        width = max(s.num_heads for s in tower_sites)
        groups[tower] = max(s.num_heads // s.num_kv_heads for s in tower_sites)
        for name in probe.scores:
            table = torch.full((depth, width), float("nan"))
            for site in tower_sites:
                total = probe.sums[name][id(site.module)]
                if isinstance(total, torch.Tensor):
                    table[site.layer, : site.num_heads] = total.detach().cpu().float() / examples
            result[name][tower] = table
    return HeadImportance(result, groups, examples, {t: dict(v) for t, v in removed.items()})


def greedy_head_pruning(model, batches, ratio: float, steps: int = 4, score: str = "gradient", scope: str = "global",
                        unit: str = "query", tower: str | None = None, loss_fn=None,
                        progress: bool = True) -> tuple[PatchConfig, HeadImportance]:
    """Remove `ratio` of the heads in `steps` rounds: each round scores the heads with the ones
    already chosen masked, and adds the lowest. Returns the final prune_heads config (patch it with
    patch_model) and the last round's importance."""
    if score not in SCORES:
        raise PatchError(f"greedy pruning rescores with one of {', '.join(SCORES)}; got {score!r}")
    if not isinstance(steps, int) or steps < 1:
        raise PatchError(f"steps must be a positive integer, got {steps!r}")
    batches = list(batches)
    removed: dict[str, dict[int, list[int]]] = {}
    config = None
    for step in range(1, steps + 1):
        importance = head_importance(model, batches, scores=(score,), loss_fn=loss_fn, towers=tower,
                                     removed=removed, progress=progress)
        name = importance._tower(tower)
        config = importance.plan(ratio * step / steps, score=score, scope=scope, unit=unit, tower=name)
        removed = {name: {layer: params["heads"] for layer, params in config.layer_params.items()}}
    return config, importance
