"""Method registry: every attention variant registers a `Method` subclass under a name."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .errors import PatchError

# Ways a method may intervene (design.md). Two methods can share a module only when the sets of
# interventions they use are disjoint, e.g. a KV-cache method on a head-pruned model.
INTERVENTIONS = ("attention", "cache", "structure", "parameters", "tokens")
MODEL_KINDS = ("decoder", "encoder", "diffusion")
INTERVENTIONS_ATTR = "_attnpatch_interventions"  # on each patched module: {intervention: method name}


@dataclass(frozen=True)
class ParamSpec:
    """One method parameter: type, default and valid range, validated with clear errors."""

    name: str
    kind: type
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple | None = None
    optional: bool = False  # None is accepted (means "not set")

    def range_text(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.kind is bool:
            return "True or False"
        if self.kind is list:
            return "a list of " + self._item_spec().range_text()
        if self.low is None and self.high is None:
            return "any " + self.kind.__name__
        lo = "-inf" if self.low is None else _fmt(self.low)
        hi = "inf" if self.high is None else _fmt(self.high)
        left = "(" if self.low is None or self.low_open else "["
        right = ")" if self.high is None or self.high_open else "]"
        return f"{self.kind.__name__} in {left}{lo}, {hi}{right}"

    def validate(self, value: Any, method: str) -> Any:
        where = f"parameter {self.name!r} of method {method!r}"
        if value is None:
            if self.optional:
                return None
            raise PatchError(f"{where} must be set: {self.range_text()}")
        if self.kind is bool:
            if not isinstance(value, bool):
                raise PatchError(f"{where} must be True or False, got {value!r}")
            return value
        if self.kind is int:
            if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
                raise PatchError(f"{where} must be an integer ({self.range_text()}), got {value!r}")
            value = int(value)
        elif self.kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise PatchError(f"{where} must be a number ({self.range_text()}), got {value!r}")
            value = float(value)
        elif self.kind is str and not isinstance(value, str):
            raise PatchError(f"{where} must be a string ({self.range_text()}), got {value!r}")
        elif self.kind is list:  # a list of integers (e.g. per-head budgets), each within the range
            if not isinstance(value, (list, tuple)) or not value:
                raise PatchError(f"{where} must be a non-empty list of integers, got {value!r}")
            item = self._item_spec()
            return [item.validate(v, method) for v in value]
        if self.choices is not None and value not in self.choices:
            raise PatchError(f"{where} is {value!r}; valid values: {self.range_text()}")
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            raise PatchError(f"{where} is {value!r}, out of range: {self.range_text()}")
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            raise PatchError(f"{where} is {value!r}, out of range: {self.range_text()}")
        return value

    def _item_spec(self) -> "ParamSpec":
        """The integer spec each element of a list parameter must satisfy (same bounds)."""
        return ParamSpec(self.name, int, None, self.help, self.low, self.high, self.low_open, self.high_open)

    def describe(self) -> dict:
        return {"name": self.name, "type": self.kind.__name__, "default": self.default,
                "range": self.range_text(), "help": self.help}


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and math.isfinite(x) else str(x)


def attnpatch_entries(module) -> list[tuple[dict, str]]:
    """(store, name) of the submodules, parameters and buffers attnpatch added directly on `module`
    (names start with attnpatch_): what `detach` removes and `save_patched` keeps out of the base
    checkpoint."""
    return [(store, name) for store in (module._modules, module._parameters, module._buffers)
            for name in store if name.startswith("attnpatch_")]


class Method:
    """Base class. A method knows the math of one attention variant and nothing of model families.

    Subclasses set the class attributes and implement `attention` (and `attach`/`detach` when they
    add parameters to the attention module). One instance is created per patched attention module.
    """

    name: ClassVar[str]
    family: ClassVar[str]
    summary: ClassVar[str]
    model_kinds: ClassVar[tuple[str, ...]] = MODEL_KINDS
    interventions: ClassVar[frozenset[str]] = frozenset({"attention"})
    params: ClassVar[tuple[ParamSpec, ...]] = ()
    trainable: ClassVar[bool] = False
    trainable_note: ClassVar[str] = ""
    # True when decoding keeps its own cache layer (see cache.py): a recurrent state, or
    # compressed K/V; `cache_layer_class` names the layer
    uses_state_cache: ClassVar[bool] = False
    cache_layer_class: ClassVar[type | None] = None

    def __init__(self, site, **params):
        self.site = site
        self.config = params
        self.calls = 0  # attention calls routed to this instance: tests' proof that the method is active

    # --- hooks a subclass may override
    @classmethod
    def check_params(cls, params: dict) -> None:
        """Cross-parameter checks (ranges of single parameters are checked by ParamSpec)."""

    def check_site(self, site) -> None:
        """Raise PatchError if this method cannot run on this attention module."""

    def attach(self, module) -> None:
        """Add trainable parameters or buffers to the attention module (names start with attnpatch_)."""

    def detach(self, module) -> None:
        """Remove every submodule, parameter and buffer `attach` added (their names start with attnpatch_)."""
        for store, name in attnpatch_entries(module):
            del store[name]

    @classmethod
    def default_sites(cls, model, sites):
        """The attention modules a config that names no towers and no layers patches (default:
        all of `sites`); a method tied to one place in the model (e.g. a vision tower's feature
        layer) picks it here."""
        return sites

    @classmethod
    def finish_patch(cls, model, adapter, placements):
        """Model-level changes once every module of a patch is attached (e.g. config fields a
        structural change needs); returns a callable that undoes them, or None."""
        return None

    @classmethod
    def after_reload(cls, model) -> None:
        """For methods whose change is baked into saved weights ("structure"): what `load_patched`
        runs on the reloaded checkpoint instead of patching again."""

    def uses_state(self) -> bool:
        return self.uses_state_cache

    def needs_unpadded_rows(self, call) -> bool:
        """True when this call's pattern is laid out from the first key (sinks, blocks, windows):
        left-padded rows then run on their real tokens only, so each row attends as it would alone."""
        return False

    def required_cache_layer(self, call):
        """This call's own cache layer, for methods whose effect lives in the cache (KV compression
        and quantisation). None when there is nothing to keep: the model runs without a cache
        (warned once: the method is then inactive) or the method leaves this layer as it is.
        Raises when nobody found the cache, so the method never silently runs with a dense one."""
        from .runtime.call import CACHE_ABSENT, CACHE_DECLINED

        if call.cache_layer is not None or call.cache_state == CACHE_DECLINED:
            return call.cache_layer
        if call.cache_state == CACHE_ABSENT:
            warn_once(f"{self.name}:no-cache",
                      f"{self.name}: the model ran without a KV cache (use_cache=False), so {self.name} kept and "
                      "compressed nothing and attention was exact. Run with use_cache=True (or pass a "
                      "DynamicCache) for the method to act.")
            return None
        raise PatchError(f"{self.name} works on the model's KV cache, but this attention call carries none "
                         f"(cache state {call.cache_state!r}): it was not made by a patched transformers decoder "
                         "during a forward with a cache. Call the patched model itself (generate() or "
                         "model(..., use_cache=True)) rather than the method's attention directly")

    def attention(self, call) -> Any:
        raise NotImplementedError

    def attention_weights(self, call) -> torch.Tensor:
        """The (B, Hq, Lq, Lk) attention weights this method's output is made of, rows summing to 1
        (materialised: for training losses and inspection, not for inference)."""
        raise PatchError(f"method '{self.name}' does not expose attention weights; the attention-weight "
                         f"cross-entropy of attention transfer needs a linearized method (linear, lolcats)")

    @property
    def is_trainable(self) -> bool:
        return self.trainable


_REGISTRY: dict[str, type[Method]] = {}
_WARNED: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """A UserWarning the first time `key` is seen in this process (a method that is legitimately
    inactive for one call says so once, not at every layer and step)."""
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, UserWarning, stacklevel=3)


def register_method(cls: type[Method]) -> type[Method]:
    missing = [a for a in ("name", "family", "summary") if not hasattr(cls, a)]
    if missing:
        raise TypeError(f"{cls.__name__} must define {missing}")
    unknown = set(cls.interventions) - set(INTERVENTIONS)
    if unknown:
        raise TypeError(f"{cls.__name__} declares unknown interventions {sorted(unknown)}; known: {INTERVENTIONS}")
    holder = _REGISTRY.get(cls.name)
    if holder is not None and holder is not cls:
        raise PatchError(f"method name {cls.name!r} is already registered by {holder.__module__}.{holder.__qualname__}; "
                         f"choose another name, or call unregister_method({cls.name!r}) first")
    _REGISTRY[cls.name] = cls
    return cls


def unregister_method(name: str) -> type[Method]:
    """Remove a method registered with `register_method` (e.g. a test's or an experiment's) and
    return its class; the built-in methods stay."""
    _load_builtin_methods()
    if name not in _REGISTRY:
        raise PatchError(f"no method {name!r} is registered; known methods: {', '.join(sorted(_REGISTRY))}")
    if _REGISTRY[name].__module__.startswith(__package__ + ".methods"):
        raise PatchError(f"{name!r} is a built-in attnpatch method and cannot be unregistered")
    return _REGISTRY.pop(name)


def method_names() -> list[str]:
    _load_builtin_methods()
    return sorted(_REGISTRY)


def get_method(name: str) -> type[Method]:
    _load_builtin_methods()
    if not isinstance(name, str) or name not in _REGISTRY:
        raise PatchError(f"unknown method {name!r}; known methods: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def resolve_params(method: str, params: dict) -> dict:
    """Defaults filled in, every value validated; unknown names rejected with the known ones listed."""
    cls = get_method(method)
    specs = {p.name: p for p in cls.params}
    unknown = sorted(set(params) - set(specs))
    if unknown:
        known = ", ".join(specs) or "none"
        raise PatchError(f"method {method!r} has no parameter(s) {unknown}; its parameters: {known}")
    resolved = {name: spec.validate(params.get(name, spec.default), method) for name, spec in specs.items()}
    cls.check_params(resolved)
    return resolved


@dataclass
class MethodInfo:
    name: str
    family: str
    summary: str
    model_kinds: tuple[str, ...]
    trainable: bool
    trainable_note: str
    interventions: tuple[str, ...]
    params: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def list_methods() -> list[MethodInfo]:
    """Every registered method with its family, model kinds, trainability and parameters."""
    _load_builtin_methods()
    return [
        MethodInfo(
            name=cls.name,
            family=cls.family,
            summary=cls.summary,
            model_kinds=tuple(cls.model_kinds),
            trainable=cls.trainable,
            trainable_note=cls.trainable_note,
            interventions=tuple(sorted(cls.interventions)),
            params=[p.describe() for p in cls.params],
        )
        for _, cls in sorted(_REGISTRY.items())
    ]


def _load_builtin_methods() -> None:
    from . import methods  # noqa: F401  (registers on import)
