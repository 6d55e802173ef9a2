"""What every method is: `Method` (the math of one attention variant, no model knowledge) and
`ParamSpec` (one validated parameter). The registry (attnpatch/registry.py) lists the methods."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..errors import PatchError, warn_once
from ..runtime.call import CACHE_ABSENT, CACHE_DECLINED

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
            if not math.isfinite(value):
                raise PatchError(f"{where} must be a finite number ({self.range_text()}), got {value!r}")
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


@dataclass(frozen=True)
class Paper:
    """The publication a method's name promises (its defaults are this paper's)."""

    title: str
    year: int
    url: str


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
    # the cache layer (runtime/layers) that replaces the model's DynamicLayer while this method
    # decodes: a recurrent state, compressed or quantised K/V; None = the model's cache as it is
    cache_layer_class: ClassVar[type | None] = None
    # the paper the name promises, and every way this implementation departs from it (declared in each
    # method's own class; an empty tuple says: none known). `shared_deviations` come from a family's base.
    paper: ClassVar[Paper]
    deviations: ClassVar[tuple[str, ...]]
    shared_deviations: ClassVar[tuple[str, ...]] = ()
    # groups of parameters that say the same thing two ways: setting more than one (to a non-default value) is an error
    exclusive_params: ClassVar[tuple[tuple[str, ...], ...]] = ()

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
    def after_reload(cls, sites) -> list[dict]:
        """For methods whose change is baked into saved weights ("structure"): the patch configs (dict
        form) `load_patched` applies to the reloaded checkpoint's attention `sites` instead of
        patching again (e.g. stripping the zero heads a pruned checkpoint carries)."""
        return []

    def transfer_modules(self) -> list:
        """Modules whose own parameters attention transfer trains besides the attnpatch_ ones
        `attach` added (a structural method's new projections, which keep the model's names)."""
        return []

    def uses_state(self) -> bool:
        """True when decoding keeps this method's own cache layer."""
        return self.cache_layer_class is not None

    def new_cache_layer(self, sliding_window: int | None = None):
        """The cache layer for one decoder layer (replacing a DynamicLayer whose model-level sliding
        window is `sliding_window`), or None to leave that layer as the model's own."""
        return self.cache_layer_class(sliding_window=sliding_window)

    def needs_unpadded_rows(self, call) -> bool:
        """True when this call's pattern is laid out from the first key (sinks, blocks, windows):
        left-padded rows then run on their real tokens only, so each row attends as it would alone."""
        return False

    def required_cache_layer(self, call):
        """This call's own cache layer, for methods whose effect lives in the cache (KV compression
        and quantisation). None when there is nothing to keep: the model runs without a cache
        (warned once: the method is then inactive) or the method leaves this layer as it is.
        Raises when nobody found the cache, so the method never silently runs with a dense one."""
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

    def transfer_loss(self, call) -> torch.Tensor | None:
        """This layer's attention-transfer loss when the method learns something other than its
        output (a gate learns where attention goes); None = MSE of the outputs (+ attention_ce)."""
        return None

    def attention_weights(self, call) -> torch.Tensor:
        """The (B, Hq, Lq, Lk) attention weights this method's output is made of, rows summing to 1
        (materialised: for training losses and inspection, not for inference)."""
        raise PatchError(f"method '{self.name}' does not expose attention weights; the attention-weight "
                         f"cross-entropy of attention transfer needs a linearized method (linear, lolcats)")

    @property
    def is_trainable(self) -> bool:
        return self.trainable
