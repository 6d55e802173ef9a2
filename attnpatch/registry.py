"""The method registry: the built-in methods (attnpatch/methods, one folder per family) and any a
user adds with `register_method`, by name."""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import PatchError
from .methods import BUILTIN_METHODS
from .methods.base import (  # noqa: F401
    INTERVENTIONS,
    INTERVENTIONS_ATTR,
    MODEL_KINDS,
    Method,
    ParamSpec,
    attnpatch_entries,
)

_REGISTRY: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Add a `Method` subclass under its `name` (usable as a class decorator); a name already
    taken by another class is an error."""
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
    if name not in _REGISTRY:
        raise PatchError(f"no method {name!r} is registered; known methods: {', '.join(sorted(_REGISTRY))}")
    if _REGISTRY[name] in BUILTIN_METHODS:
        raise PatchError(f"{name!r} is a built-in attnpatch method and cannot be unregistered")
    return _REGISTRY.pop(name)


def method_names() -> list[str]:
    return sorted(_REGISTRY)


def get_method(name: str) -> type[Method]:
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


for _builtin in BUILTIN_METHODS:
    register_method(_builtin)
