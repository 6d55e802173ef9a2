"""`kv_merge`: fuse the key/value heads of a layer into fewer kv heads (multi-query / GQA
conversion), so the KV cache shrinks by the merge factor with no eviction.

Each new kv head fuses `kv_heads_before / kv_heads` original heads: their key and value projections
are averaged ("mean", the GQA uptraining paper's best start), the first one is kept ("first", its
ablation), or the group's principal key and value components are kept and the query and output
projections of the group's query heads rewritten to read them ("pca", ops/head_merge.py: our
addition; with activation statistics from `calibrate_from_activations` it starts SmolLM2's 3 -> 1
merge far closer to the dense model). Which heads fuse: neighbours ("adjacent"), or the most
similar projections ("similarity": cosine of the stacked key+value weights, greedy). Queries
follow their kv head, so with "similarity" the query rows and output columns are reordered
(outputs are unchanged by the order). RoPE rotates every head alike, so averaging projections
equals averaging rotated keys.

Stage 1 of a recipe trains the fused projections with the rest of the model frozen: under
`attention_transfer` each merged module also runs with its original projections (the teacher),
records MSE(merged output, original output) and passes the original output on. The change is
structural: the config's num_key_value_heads is updated so `save_pretrained` reloads with plain
transformers as a model with fewer kv heads (layers merged less than the tower's widest layer are
saved with their kv heads repeated, which is exact, and `load_patched` fuses the repeats again).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ...errors import PatchError
from ...runtime.modes import active_transfer
from ...ops.head_merge import principal_merge
from ..base import INTERVENTIONS_ATTR, Method, Paper, ParamSpec
from ..heads.surgery import (augmented_rows, check_surgery_site, config_update, fused_linear, gather_blocks,
                      linear_from_rows, merge_groups, sliced_linear)

FUSIONS = ("mean", "first", "pca")
GROUPINGS = ("adjacent", "similarity")


def repeated_kv(kv_heads: int, full_kv_heads: int) -> list[int]:
    """kv head of a layer with `kv_heads` that each of `full_kv_heads` slots repeats (query head h
    uses slot h // (H / full) in the wider layout, which holds the same kv head as h // (H / kv_heads))."""
    return [slot // (full_kv_heads // kv_heads) for slot in range(full_kv_heads)]


def repeated_heads(weight: torch.Tensor, size: int) -> int:
    """The fewest distinct kv heads `weight` (kv heads x size rows) holds as repeats of
    `repeated_kv`, e.g. 1 when every block is equal: what a saved merged layer carries."""
    heads = weight.shape[0] // size
    blocks = weight.reshape(heads, -1)
    for fewer in range(1, heads + 1):
        if heads % fewer == 0 and torch.equal(blocks, blocks[repeated_kv(fewer, heads)]):
            return fewer
    return heads


class KVMerge(Method):
    name = "kv_merge"
    paper = Paper('GQA: Training Generalized Multi-Query Transformer Models from Multi-Head Checkpoints', 2023, "https://arxiv.org/abs/2305.13245")
    deviations = ()
    family = "kv-compressed"
    summary = ("GQA/MQA conversion: fuses each layer's key/value heads into fewer kv heads (mean-pooled, "
               "DHA-style grouping optional), shrinking the KV cache with no eviction; stage 1 of a recipe trains "
               "the fused projections, LoRA recovers the rest; saves as a plain model with fewer kv heads.")
    model_kinds = ("decoder",)
    interventions = frozenset({"structure"})
    trainable = True
    trainable_note = "attention transfer trains the fused key/value projections (the model stays frozen)"
    params = (
        ParamSpec("kv_heads", int, 1, "kv heads this layer keeps; must divide its current kv heads (1 = multi-query)",
                  low=1),
        ParamSpec("fusion", str, "mean", "how a group's projections become one: mean (GQA uptraining), first, or "
                  "pca (the group's principal key and value components, queries and output projection adjusted to "
                  "read them; from measured activations after calibrate_from_activations)", choices=FUSIONS),
        ParamSpec("grouping", str, "adjacent", "which kv heads fuse: adjacent ones, or the most similar projections",
                  choices=GROUPINGS),
    )

    def check_site(self, site) -> None:
        check_surgery_site(site, self.name, INTERVENTIONS_ATTR)
        norms = [name for name in ("q_norm", "k_norm") if isinstance(getattr(site.module, name, None), nn.Module)]
        if self.config["fusion"] == "pca" and norms:
            raise PatchError(f"kv_merge fusion='pca' rewrites key heads inside their projections, which {site.label} "
                             f"normalises afterwards ({', '.join(norms)}); use fusion='mean' for this model")
        target = self.config["kv_heads"]
        if site.num_kv_heads % target:
            divisors = [d for d in range(1, site.num_kv_heads + 1) if site.num_kv_heads % d == 0]
            raise PatchError(f"kv_merge cannot fuse the {site.num_kv_heads} kv heads of {site.label} into {target}: "
                             f"kv_heads must divide {site.num_kv_heads} (valid: {divisors})")

    def attach(self, module) -> None:
        site = self.site
        q, k, v, out = site.heads.projections
        self._original = {name: getattr(module, name) for name in (q, k, v, out)}
        stacked = torch.cat([self._original[p].weight.detach().reshape(site.num_kv_heads, -1) for p in (k, v)], dim=1)
        self.groups = merge_groups(stacked, self.config["kv_heads"], self.config["grouping"])
        counts = {"heads": site.num_heads, "kv_heads": len(self.groups), "groups": site.num_heads // len(self.groups)}
        self._original_attrs = {attr: getattr(module, attr) for attr, _ in site.heads.count_attrs}
        self._merged_attrs = {attr: counts[what] for attr, what in site.heads.count_attrs}
        self.initialise(None)
        self._hooks = [module.register_forward_hook(self._transfer, with_kwargs=True),
                       module.register_state_dict_post_hook(lambda *args: self._repeat_state(*args)),
                       module.register_load_state_dict_pre_hook(lambda *args: self._fuse_repeats(*args))]

    @property
    def wants_activations(self) -> bool:
        """Whether `initialise` uses measured input statistics (the pca fusion does)."""
        return self.config["fusion"] == "pca"

    def initialise(self, input_covariance: torch.Tensor | None) -> None:
        """(Re)build the merged projections from the original ones; with fusion='pca', from the
        principal components under E[x x^T] of the layer's inputs (augmented with a constant 1),
        or the projections' SVD when None."""
        site, size = self.site, self.site.head_dim
        q, k, v, out = site.heads.projections
        group = site.num_heads // site.num_kv_heads
        query_order = [kv * group + i for members in self.groups for kv in members for i in range(group)]
        source = dict(self._original)
        if self.config["fusion"] == "pca":
            rows = principal_merge(augmented_rows(source[q]), augmented_rows(source[k]), augmented_rows(source[v]),
                                   source[out].weight.detach().double(), self.groups, group, size, input_covariance)
            merged = {k: linear_from_rows(source[k], rows[1]), v: linear_from_rows(source[v], rows[2])}
            source[q] = linear_from_rows(source[q], rows[0])
            source[out] = sliced_linear(source[out], list(range(source[out].in_features)), 1, rows=False)
            with torch.no_grad():
                source[out].weight.copy_(rows[3])
        else:
            merged = {name: fused_linear(source[name], self.groups, size, self.config["fusion"]) for name in (k, v)}
        if query_order != list(range(site.num_heads)) or source[q] is not self._original[q]:
            merged[q] = sliced_linear(source[q], query_order, size, rows=True)
            merged[out] = sliced_linear(source[out], query_order, size, rows=False)
        self._merged = merged
        self._use(site.module, merged, self._merged_attrs)

    @contextlib.contextmanager
    def original_heads(self):
        """While the block runs the module computes with its original heads (the dense model)."""
        module = self.site.module
        current = {name: getattr(module, name) for name in self._original}
        self._use(module, self._original, self._original_attrs)
        try:
            yield
        finally:
            self._use(module, current, self._merged_attrs)

    def detach(self, module) -> None:
        for hook in getattr(self, "_hooks", []):
            hook.remove()
        if hasattr(self, "_original"):
            self._use(module, self._original, self._original_attrs)
        super().detach(module)

    @staticmethod
    def _use(module, projections: dict, attrs: dict) -> None:
        for name, linear in projections.items():
            setattr(module, name, linear)
        for attr, value in attrs.items():
            setattr(module, attr, value)

    def transfer_modules(self) -> list[nn.Module]:
        """What attention transfer trains: the fused key and value projections (and the query and
        output projections where the merge rewrote them)."""
        return list(self._merged.values())

    # --- attention transfer: the merged module against the same module with its original heads
    def _transfer(self, module, args, kwargs, output):
        transfer = active_transfer()
        if transfer is None:
            return None
        losses, attention_ce = transfer
        if attention_ce > 0:
            raise PatchError("kv_merge's attention transfer compares whole attention outputs; attention_ce (the "
                             "attention-weight cross-entropy) applies to linearized methods: set it to 0")
        with torch.no_grad(), self.original_heads():  # then the projections in place now (peft may wrap them)
            teacher = module.forward(*args, **kwargs)
        student = output[0] if isinstance(output, tuple) else output
        target = teacher[0] if isinstance(teacher, tuple) else teacher
        losses.append(nn.functional.mse_loss(student.float(), target.float()))
        self.calls += 1
        return teacher

    # --- checkpoints: every layer of a tower saved with the tower's kv head count (repeats are exact)
    def _full_kv_heads(self, module) -> int:
        return int(getattr(module.config, "num_key_value_heads", None) or self.site.num_kv_heads)

    def _kv_keys(self, prefix: str):
        _, k, v, _ = self.site.heads.projections
        return [f"{prefix}{name}.{kind}" for name in (k, v) for kind in ("weight", "bias")]

    def _repeat_state(self, module, state_dict, prefix, local_metadata) -> None:
        full = self._full_kv_heads(module)
        if full == len(self.groups):
            return
        for key in self._kv_keys(prefix):
            if key in state_dict:
                state_dict[key] = gather_blocks(state_dict[key], repeated_kv(len(self.groups), full),
                                                self.site.head_dim, 0)

    def _fuse_repeats(self, module, state_dict, prefix, *args) -> None:
        """Accept a checkpoint in the tower's geometry (what `_repeat_state` wrote) by keeping one copy."""
        full = self._full_kv_heads(module)
        for key in self._kv_keys(prefix):
            tensor = state_dict.get(key)
            if tensor is not None and full != len(self.groups) and tensor.shape[0] == full * self.site.head_dim:
                keep = [j * (full // len(self.groups)) for j in range(len(self.groups))]
                state_dict[key] = gather_blocks(tensor, keep, self.site.head_dim, 0)

    @classmethod
    def finish_patch(cls, model, adapter, placements):
        """Each tower's config gets the widest layer's kv heads, so plain transformers rebuilds it."""
        towers: dict[str, list] = {}
        for site in adapter.sites(model):
            towers.setdefault(site.tower, []).append(site)
        updates = []
        for tower in sorted({site.tower for site, _ in placements}):
            sites = towers[tower]
            widest = max(site.num_kv_heads for site in sites)
            uneven = [site.label for site in sites if widest % site.num_kv_heads]
            if uneven:
                raise PatchError(f"after kv_merge the layers of {tower} keep kv heads {[s.num_kv_heads for s in sites]}; "
                                 f"each must divide the widest ({widest}) so one checkpoint holds them all "
                                 f"({uneven[:3]} do not): choose per-layer kv_heads that divide each other")
            if not hasattr(sites[0].module.config, "num_key_value_heads"):
                raise PatchError(f"{tower}'s config has no num_key_value_heads; kv_merge needs a GQA-capable model")
            updates.append((sites[0].module.config, {"num_key_value_heads": widest}))
        return config_update(updates)

    @classmethod
    def after_reload(cls, sites) -> list[dict]:
        """Layers saved with repeated kv heads fuse them again (exactly: the repeats are equal)."""
        found: dict[str, dict[int, int]] = {}
        for site in sites:
            if site.heads is None:
                continue
            _, k, v, _ = site.heads.projections
            weights = torch.cat([getattr(site.module, p).weight.detach() for p in (k, v)], dim=1)
            fewer = repeated_heads(weights, site.head_dim)
            if fewer < site.num_kv_heads:
                found.setdefault(site.tower, {})[site.layer] = fewer
        return [{"method": "kv_merge", "layers": sorted(layers), "towers": [tower],
                 "params": {"fusion": "first"},
                 "layer_params": {layer: {"kv_heads": kv} for layer, kv in layers.items()}}
                for tower, layers in found.items()]
