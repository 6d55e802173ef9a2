"""`prune_heads`: whole attention heads removed physically, GQA-aware, saved so plain transformers
reloads the pruned model.

In memory every layer keeps exactly its own heads (q/k/v rows and output columns sliced; kv groups
whose query heads are all gone are dropped with their kv head), so compute and parameters fall
per layer. transformers builds every layer of a tower from one config, so the config gets the
tower's widest geometry (and an explicit head_dim), and `state_dict()` of a pruned module pads its
weights to that geometry with zero heads, which add exactly nothing: `save_pretrained` + plain
`from_pretrained` gives the same outputs, and `compact_heads` (run by `load_patched`) strips the
zero heads again. Where the module class cannot take fewer heads from its config (CLIP sizes its
projections from hidden_size), the config keeps the original counts and the checkpoint is padded
to them.
"""

from __future__ import annotations

from collections import defaultdict

from ...errors import PatchError
from ..base import INTERVENTIONS_ATTR, Method, Paper, ParamSpec
from .surgery import (HeadArrangement, check_surgery_site, config_update, gather_blocks, padded_blocks, sliced_linear,
                      unpadded_blocks, zero_heads)


def _full_geometry(config) -> tuple[int, int]:
    """(kv heads, group size) every layer of the tower has in a saved checkpoint."""
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    return kv, heads // kv


class PruneHeads(Method):
    name = "prune_heads"
    paper = Paper('Are Sixteen Heads Really Better than One?', 2019, "https://arxiv.org/abs/1905.10650")
    deviations = ()
    family = "head-pruned"
    summary = ("Removes whole attention heads physically (q/k/v rows, output columns), GQA-aware; the config "
               "is updated so save_pretrained reloads with plain transformers.")
    model_kinds = ("decoder", "encoder")
    interventions = frozenset({"structure"})
    params = (
        ParamSpec("heads", list, None, "query heads to remove in this layer (set per layer with layer_params, e.g. "
                  "from head_importance(...).plan(ratio)); removing every query head of a kv group removes the group; "
                  "unset = keep every head of the layer", low=0, optional=True),
    )

    def check_site(self, site) -> None:
        check_surgery_site(site, self.name, INTERVENTIONS_ATTR)
        self.arrangement = HeadArrangement.removing(site.num_heads, site.num_kv_heads, self.config["heads"] or [],
                                                   site.label)

    def attach(self, module) -> None:
        site, arrangement = self.site, self.arrangement
        self._hooks, self._original_attrs = [], {}
        q, k, v, out = site.heads.projections
        size = site.head_dim
        self._original = {name: getattr(module, name) for name in (q, k, v, out)}
        kv_blocks = list(arrangement.kv_heads)
        replacements = {
            q: sliced_linear(self._original[q], arrangement.query_blocks, size, rows=True),
            k: sliced_linear(self._original[k], kv_blocks, size, rows=True),
            v: sliced_linear(self._original[v], kv_blocks, size, rows=True),
            out: sliced_linear(self._original[out], arrangement.query_blocks, size, rows=False),
        }
        for name, linear in replacements.items():
            setattr(module, name, linear)
        counts = {"heads": arrangement.num_heads, "kv_heads": arrangement.num_kv_heads,
                  "groups": arrangement.group_size}
        self._original_attrs = {attr: getattr(module, attr) for attr, _ in site.heads.count_attrs}
        for attr, what in site.heads.count_attrs:
            setattr(module, attr, counts[what])
        # torch marks its hooks with an attribute, which bound methods cannot carry: wrap them
        self._hooks = [module.register_state_dict_post_hook(lambda *args: self._pad_state(*args)),
                       module.register_load_state_dict_pre_hook(lambda *args: self._unpad_state(*args))]

    def detach(self, module) -> None:
        for hook in self._hooks:
            hook.remove()
        for name, linear in getattr(self, "_original", {}).items():
            setattr(module, name, linear)
        for attr, value in self._original_attrs.items():
            setattr(module, attr, value)
        super().detach(module)

    # --- checkpoints hold the tower's full geometry (zero heads where this layer has none)
    def _state_keys(self, prefix: str):
        q, k, v, out = self.site.heads.projections
        for name, kind in ((q, "query"), (k, "kv"), (v, "kv"), (out, "out")):
            yield f"{prefix}{name}.weight", kind, 1 if kind == "out" else 0
            if kind != "out":
                yield f"{prefix}{name}.bias", kind, 0

    def _pad_state(self, module, state_dict, prefix, local_metadata) -> None:
        full_kv, full_group = _full_geometry(module.config)
        a = self.arrangement
        if (a.num_kv_heads, a.group_size) == (full_kv, full_group):
            return
        blocks = dict(zip(("query", "kv"), padded_blocks(a.num_kv_heads, a.group_size, full_kv, full_group)))
        blocks["out"] = blocks["query"]
        for key, kind, dim in self._state_keys(prefix):
            if key in state_dict:
                state_dict[key] = gather_blocks(state_dict[key], blocks[kind], self.site.head_dim, dim)

    def _unpad_state(self, module, state_dict, prefix, *args) -> None:
        """Accept a checkpoint in the full geometry (what `_pad_state` wrote) by keeping this layer's heads."""
        full_kv, full_group = _full_geometry(module.config)
        a = self.arrangement
        blocks = dict(zip(("query", "kv"), unpadded_blocks(a.num_kv_heads, a.group_size, full_group)))
        blocks["out"] = blocks["query"]
        full = {"query": full_kv * full_group, "kv": full_kv, "out": full_kv * full_group}
        for key, kind, dim in self._state_keys(prefix):
            tensor = state_dict.get(key)
            padded = tensor is not None and tensor.shape[dim] == full[kind] * self.site.head_dim
            if padded and full[kind] != len(blocks[kind]):
                state_dict[key] = gather_blocks(tensor, blocks[kind], self.site.head_dim, dim)

    # --- the tower's config: the widest layer's geometry, so plain transformers rebuilds the shapes
    @classmethod
    def finish_patch(cls, model, adapter, placements):
        if not any(method.config["heads"] for _, method in placements):
            raise PatchError("prune_heads got no heads to remove: pass heads=[...] per layer (layer_params={layer: "
                             "{'heads': [...]}}); head_importance(model, batches).plan(ratio=...) builds that config")
        towers = defaultdict(list)
        for site in adapter.sites(model):
            towers[site.tower].append(site)
        updates = []
        for tower in sorted({site.tower for site, _ in placements}):
            sites = towers[tower]
            config = sites[0].module.config
            if not all(s.heads is not None and s.heads.config_sets_head_dim for s in sites):
                continue  # the checkpoint keeps the original counts, padded with zero heads
            kv = max(s.num_kv_heads for s in sites)
            group = max(s.num_heads // s.num_kv_heads for s in sites)
            values = {"num_attention_heads": kv * group, "head_dim": sites[0].head_dim}
            if hasattr(config, "num_key_value_heads"):
                values["num_key_value_heads"] = kv
            elif group != 1:
                raise PatchError(f"{tower} has grouped kv heads but its config has no num_key_value_heads")
            updates.append((config, values))
        return config_update(updates)

    @classmethod
    def after_reload(cls, sites) -> list[dict]:
        """A checkpoint saved from a pruned model holds zero heads where layers were narrower; strip them."""
        return zero_head_patches(sites)



def zero_head_patches(sites, towers: list[str] | None = None) -> list[dict]:
    """One `prune_heads` patch (dict form) per tower that removes every head whose output-projection
    columns are all zero (the padding a saved pruned checkpoint carries)."""
    found: dict[str, dict[int, list[int]]] = defaultdict(dict)
    for site in sites:
        if site.heads is None or (towers is not None and not any(t in site.tower for t in towers)):
            continue
        zero = zero_heads(getattr(site.module, site.heads.projections[3]), site.head_dim)
        if zero:
            found[site.tower][site.layer] = zero
    return [{"method": "prune_heads", "layers": sorted(layers), "towers": [tower],
             "layer_params": {layer: {"heads": heads} for layer, heads in layers.items()}}
            for tower, layers in found.items()]
