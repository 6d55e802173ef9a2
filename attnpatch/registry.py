"""The method registry, by name. It finds the methods itself, the first time it is asked:

- built-ins: every module under attnpatch/methods is scanned, and each `Method` subclass that sets
  `name` in its own class body is a method (adding one is its file, its test and the docs);
- plugins: the `attnpatch.methods` entry-point group of installed packages, each entry a `Method`
  subclass or a module scanned the same way (pyproject.toml:
  `[project.entry-points."attnpatch.methods"] my_method = "my_package.my_method:MyMethod"`);
- methods a user adds at run time with `register_method`.

It imports only the methods' contract (methods/base.py), never the methods package itself."""

from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .errors import PatchError
from .methods.base import INTERVENTIONS, Method

BUILTIN_PACKAGE = "attnpatch.methods"
ENTRY_POINT_GROUP = "attnpatch.methods"

_REGISTRY: dict[str, type[Method]] = {}
_BUILTINS: set[type[Method]] = set()
_discovered = False


def methods_declared_in(module) -> list[type[Method]]:
    """The methods a module defines: `Method` subclasses of that module that set `name` themselves
    (a family's base class sets none; a subclass such as pyramidkv of snapkv sets its own)."""
    return [obj for obj in vars(module).values()
            if isinstance(obj, type) and issubclass(obj, Method) and obj.__module__ == module.__name__
            and "name" in vars(obj)]


def _builtin_methods() -> list[type[Method]]:
    root = Path(__file__).parent / "methods"
    found = []
    for info in sorted(pkgutil.walk_packages([str(root)], prefix=BUILTIN_PACKAGE + "."), key=lambda i: i.name):
        found += methods_declared_in(importlib.import_module(info.name))
    return found


def load_plugins() -> list[str]:
    """Register the methods of installed packages' `attnpatch.methods` entry points (done once on first
    use; call again after installing a plugin in a running session). A plugin that fails to load or
    takes a name already registered is skipped with a warning, so one broken package cannot break
    attnpatch. Returns the names registered."""
    if not _discovered:
        _discover()  # which loads them
        return sorted(name for name, cls in _REGISTRY.items() if cls not in _BUILTINS)
    return _load_entry_points()


def _load_entry_points() -> list[str]:
    added = []
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        where = f"entry point {entry.name!r} = {entry.value!r} (package {getattr(entry.dist, 'name', '?')})"
        try:
            loaded = entry.load()
            classes = [loaded] if isinstance(loaded, type) else methods_declared_in(loaded)
            if not classes or not all(isinstance(c, type) and issubclass(c, Method) for c in classes):
                raise TypeError("it is neither a Method subclass nor a module that defines one")
            for cls in classes:
                if _REGISTRY.get(cls.name) is not cls:
                    register_method(cls)
                    added.append(cls.name)
        except Exception as error:  # noqa: BLE001 - a broken plugin is reported, not fatal
            warnings.warn(f"attnpatch: skipped the method plugin {where}: {type(error).__name__}: {error}",
                          stacklevel=3)
    return added


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True  # first: registering below asks for discovery again
    try:
        builtins = _builtin_methods()
    except BaseException:
        _discovered = False  # a failed scan is retried on the next call, not left half done
        raise
    for cls in builtins:
        register_method(cls)
        _BUILTINS.add(cls)
    _load_entry_points()


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
    _discover()
    if name not in _REGISTRY:
        raise PatchError(f"no method {name!r} is registered; known methods: {', '.join(sorted(_REGISTRY))}")
    if _REGISTRY.get(name) in _BUILTINS:
        raise PatchError(f"{name!r} is a built-in attnpatch method and cannot be unregistered")
    return _REGISTRY.pop(name)


def method_names() -> list[str]:
    _discover()
    return sorted(_REGISTRY)



def get_method(name: str) -> type[Method]:
    _discover()
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
    for group in cls.exclusive_params:
        given = [name for name in group if resolved[name] is not None and resolved[name] != specs[name].default]
        if len(given) > 1:
            raise PatchError(f"method {method!r}: {' and '.join(f'{n}={resolved[n]!r}' for n in given)} say the same "
                             f"thing two ways; set one of {list(group)}")
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
    paper: dict = field(default_factory=dict)  # title, year, url
    deviations: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def list_methods() -> list[MethodInfo]:
    """Every registered method with its family, model kinds, trainability and parameters."""
    _discover()
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
            paper=dict(vars(cls.paper)) if getattr(cls, "paper", None) else {},
            deviations=tuple(getattr(cls, "deviations", ())) + tuple(cls.shared_deviations),
        )
        for _, cls in sorted(_REGISTRY.items())
    ]



def papers_markdown() -> str:
    """Each method's paper and its declared deviations from it, as a markdown table (attnpatch/README.md
    holds it between the papers markers; `attnpatch list --papers` prints the same)."""
    lines = ["| method | paper | deviations from it |", "|---|---|---|"]
    for info in list_methods():
        paper = f"[{info.paper['title']}]({info.paper['url']}) ({info.paper['year']})" if info.paper else "-"
        lines.append(f"| `{info.name}` | {paper} | {'; '.join(info.deviations) or 'none known'} |")
    return "\n".join(lines)
