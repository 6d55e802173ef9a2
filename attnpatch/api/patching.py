"""patch_model / unpatch_model: pairing methods with a model's attention sites, in place and reversibly."""

from __future__ import annotations

import types
import warnings
import weakref
from dataclasses import dataclass, field

from torch import nn

from ..adapters import Adapter, AttentionSite, find_adapter
from ..config import PatchConfig
from ..errors import PatchError
from ..methods.base import INTERVENTIONS_ATTR, Method, attnpatch_entries
from ..methods.heads.prune import zero_head_patches
from ..registry import get_method, resolve_params
from ..runtime.wrappers import base_model

RECORD_ATTR = "_attnpatch_record"


@dataclass
class _AppliedPatch:
    config: PatchConfig
    adapter: Adapter
    placements: list[tuple[AttentionSite, Method]] = field(default_factory=list)
    undo_model: object = None  # what the method's finish_patch returned
    undo_watch: object = None  # what the adapter's watch_model returned
    # the trainable parameters the patch added, with their values at patch time (save_patched says which
    # were never trained)
    initial: list = field(default_factory=list)

    @property
    def baked(self) -> bool:
        """A structural change lives in the weights and config: a checkpoint holds it already."""
        return "structure" in get_method(self.config.method).interventions


_PATCHED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()  # the models that hold patch records


def _records(model: nn.Module) -> list[_AppliedPatch]:
    _PATCHED.add(model)
    return model.__dict__.setdefault(RECORD_ATTR, [])


def patched_owner(model: nn.Module) -> nn.Module | None:
    """The module that holds the patch state for `model`: the model itself, the patched model a wrapper
    (peft) holds, or the patched model an inner module belongs to; None when nothing around it is patched."""
    if getattr(model, "__dict__", {}).get(RECORD_ATTR):
        return model
    if not isinstance(model, nn.Module):  # a stand-in object (a test's, an evaluation harness's): nothing inside
        return None
    for module in model.modules():  # a wrapper around the patched model
        if module.__dict__.get(RECORD_ATTR):
            return module
    for root in list(_PATCHED):  # an inner module of a patched model
        if root.__dict__.get(RECORD_ATTR) and any(module is model for module in root.modules()):
            return root
    return None


def _records_of(model: nn.Module) -> list[_AppliedPatch]:
    owner = patched_owner(model)
    return [] if owner is None else owner.__dict__[RECORD_ATTR]


def patched_configs(model: nn.Module) -> list[PatchConfig]:
    """The configs applied to this model (or the patched model it wraps or belongs to), in order."""
    return [record.config for record in _records_of(model)]


def patched_methods(model: nn.Module) -> list[Method]:
    """The method instances placed on the model's attention modules (one per module, in patch
    order): where per-call statistics such as a sparse method's `last_density` can be read."""
    return [method for record in _records_of(model) for _, method in record.placements]


def is_patched(model: nn.Module) -> bool:
    return patched_owner(model) is not None


def _select_sites(sites: list[AttentionSite], config: PatchConfig) -> list[AttentionSite]:
    towers = sorted({s.tower for s in sites})
    if config.towers is not None:
        sites = [s for s in sites if any(t in s.tower for t in config.towers)]
        if not sites:
            raise PatchError(f"towers={config.towers} matches no attention stack; this model has: {towers}")
    if not config.include_cross_attention:
        self_sites = [s for s in sites if not s.cross]
        if not self_sites:
            raise PatchError("every selected attention module is cross-attention; pass include_cross_attention=True")
        sites = self_sites
    for tower in sorted({s.tower for s in sites}):
        depth = next(s.num_layers for s in sites if s.tower == tower)
        outside = sorted(index for index in config.layer_params if not -depth <= index < depth)
        if outside:
            raise PatchError(f"layer_params names layer(s) {outside}, out of range for {tower}, which has {depth} layers "
                             f"(valid: {-depth}..{depth - 1})")
    if config.layers == "all":
        return sites
    chosen = []
    for tower in sorted({s.tower for s in sites}):
        in_tower = [s for s in sites if s.tower == tower]
        depth = in_tower[0].num_layers
        wanted = set()
        for index in config.layers:
            if not -depth <= index < depth:
                raise PatchError(
                    f"layer {index} is out of range for {tower}, which has {depth} layers (valid: {-depth}..{depth - 1}); "
                    "use towers=[...] to patch one stack of a multi-tower model"
                )
            wanted.add(index % depth)
        chosen += [s for s in in_tower if s.layer in wanted]
    return chosen


def _plan(model: nn.Module, config: PatchConfig) -> tuple[Adapter, list[tuple[AttentionSite, Method]]]:
    method_cls = get_method(config.method)
    adapter, sites = find_adapter(model)
    if config.towers is None and config.layers == "all" and not config.layer_params:
        sites = method_cls.default_sites(model, sites)
    sites = _select_sites(sites, config)
    plan = []
    for site in sites:
        if site.kind not in method_cls.model_kinds:
            raise PatchError(
                f"method {config.method!r} supports {list(method_cls.model_kinds)} models, but {site.label} is a "
                f"{site.kind} attention"
            )
        taken = site.module.__dict__.get(INTERVENTIONS_ATTR, {})
        clash = sorted(set(taken) & set(method_cls.interventions))
        if clash:
            holders = sorted({taken[c] for c in clash})
            raise PatchError(
                f"{site.label} is already patched with {holders} ({', '.join(clash)}); methods that intervene the same "
                "way cannot be stacked on one module. Call unpatch_model(model) first, choose other layers, or "
                "stack methods that intervene differently (e.g. a cache method on a structurally pruned model)."
            )
        params = config.params_for_layer(site.layer, site.num_layers)
        if config.layer_params:
            params = resolve_params(config.method, params)
        method = method_cls(site, **params)
        method.check_site(site)
        plan.append((site, method))
    return adapter, plan


def _routes_attention(method: Method) -> bool:
    return "attention" in method.interventions


def _remove(adapter: Adapter, site: AttentionSite, method: Method) -> None:
    if _routes_attention(method):
        adapter.uninstall(site)
    method.detach(site.module)
    taken = site.module.__dict__.get(INTERVENTIONS_ATTR, {})
    for intervention in method.interventions:
        taken.pop(intervention, None)
    if not taken:
        site.module.__dict__.pop(INTERVENTIONS_ATTR, None)


def patch_model(
    model: nn.Module,
    method_or_config: str | PatchConfig | dict,
    *,
    layers: str | list[int] = "all",
    layer_params: dict | None = None,
    towers: list[str] | str | None = None,
    include_cross_attention: bool = False,
    **params,
) -> nn.Module:
    """Patch the model's attention in place and return it.

    `method_or_config` is a method name (parameters as keyword arguments), a PatchConfig, or its
    dict form. Everything is validated before the model is touched, and if applying fails midway
    every change already made is undone, so a failed patch leaves the model exactly as it was.
    """
    if isinstance(method_or_config, (PatchConfig, dict)):
        if params or layer_params or towers is not None or layers != "all" or include_cross_attention:
            raise PatchError("pass either a PatchConfig (or dict) or a method name with keyword arguments, not both")
        config = method_or_config if isinstance(method_or_config, PatchConfig) else PatchConfig.from_dict(method_or_config)
    elif isinstance(method_or_config, str):
        config = PatchConfig(method_or_config, params, layers, layer_params or {}, towers, include_cross_attention)
    else:
        raise PatchError(f"method_or_config must be a method name, PatchConfig or dict, got {type(method_or_config).__name__}")
    config = config.validated()
    given, model = model, base_model(model)  # a peft wrapper: the transformers model inside it is patched
    adapter, plan = _plan(model, config)

    record = _AppliedPatch(config, adapter)
    try:
        for site, method in plan:
            record.placements.append((site, method))
            method.attach(site.module)
            if _routes_attention(method):
                adapter.install(site, method)
            taken = site.module.__dict__.setdefault(INTERVENTIONS_ATTR, {})
            for intervention in method.interventions:
                taken[intervention] = method.name
        record.initial = [(method.name, p, p.detach().clone()) for site, method in record.placements if method.is_trainable
                          for p in _added_parameters(site.module)]
        record.undo_model = get_method(config.method).finish_patch(model, adapter, record.placements)
        record.undo_watch = adapter.watch_model(model, record.placements)
    except BaseException:
        if record.undo_model is not None:
            record.undo_model()
        for site, method in reversed(record.placements):
            _remove(adapter, site, method)
        raise
    _records(model).append(record)
    if record.initial and "save_pretrained" not in model.__dict__:  # bound to the model (a deepcopy rebinds it)
        model.save_pretrained = types.MethodType(_save_pretrained_with_a_warning, model)
    return given


def _added_parameters(module: nn.Module) -> list:
    return [p for store, name in attnpatch_entries(module)
            for p in ([store[name]] if store is module._parameters else
                      list(store[name].parameters()) if store is module._modules else [])]


def untrained_methods(model: nn.Module) -> list[str]:
    """Methods whose added trainable parameters all still hold their values from patch time."""
    untrained = {}
    for record in _records_of(model):
        for name, parameter, initial in record.initial:
            same = parameter.shape == initial.shape and bool((parameter.detach().cpu() == initial.cpu()).all())
            untrained[name] = untrained.get(name, True) and same
    return [name for name, never in untrained.items() if never]


def _save_pretrained_with_a_warning(model: nn.Module, *args, **kwargs):
    """model.save_pretrained of a patched model with added parameters: saved as transformers would, with a
    warning that the patch itself is not (save_patched records it; from_pretrained drops attnpatch_* keys)."""
    warnings.warn(f"save_pretrained on a patched {type(model).__name__} writes attnpatch's parameters as attnpatch_* "
                  "keys that from_pretrained drops, and not the patch itself; use attnpatch.save_patched(model, "
                  "folder) and attnpatch.load_patched(folder)", stacklevel=2)
    return type(model).save_pretrained(model, *args, **kwargs)


def unpatch_model(model: nn.Module) -> nn.Module:
    """Undo every patch: modules, configs, processors and parameters as they were before patching.
    `model` may be the patched model, a wrapper around it (peft) or one of its modules; returns `model`.
    Warns when nothing in or around it is patched."""
    owner = patched_owner(model)
    if owner is None:
        warnings.warn(f"unpatch_model: nothing in or around this {type(model).__name__} is patched; nothing to undo",
                      stacklevel=2)
        return model
    records = owner.__dict__.pop(RECORD_ATTR, [])
    _PATCHED.discard(owner)
    owner.__dict__.pop("save_pretrained", None)
    for record in reversed(records):
        if record.undo_watch is not None:
            record.undo_watch()
        if record.undo_model is not None:
            record.undo_model()
        for site, method in reversed(record.placements):
            _remove(record.adapter, site, method)
    return model


def compact_heads(model: nn.Module, towers: list[str] | None = None) -> dict[str, dict[int, list[int]]]:
    """Remove every head whose output-projection columns are all zero (the padding a saved pruned
    checkpoint carries) with a `prune_heads` patch per tower; returns {tower: {layer: heads removed}}.
    Outputs do not change; compute and parameters fall to the pruned model's."""
    _, sites = find_adapter(model)
    patches = zero_head_patches(sites, towers)
    for patch in patches:
        patch_model(model, PatchConfig.from_dict(patch))
    return {patch["towers"][0]: {layer: p["heads"] for layer, p in patch["layer_params"].items()} for patch in patches}
