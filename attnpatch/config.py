"""PatchConfig: what to patch, with which method and parameters; validated and JSON round-trippable.
Method specs (`name:key=value,...` or a JSON file) are how the command line names one."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import PatchError
from .registry import resolve_params


@dataclass
class PatchConfig:
    """One patch request.

    method: a name from `list_methods()`.
    params: method parameters (defaults filled in by `validated()`).
    layers: "all" or a list of layer indices within each selected tower (negative indices count
        from the end, as in Python).
    layer_params: per-layer parameter overrides, {layer index: {param: value}}; each overridden
        layer must be selected by `layers`.
    towers: None for every attention stack of the model, or substrings of stack paths to keep,
        e.g. ["vision"] for the vision tower of CLIP or Llava, ["language_model"] for Llava's LM.
    include_cross_attention: also patch cross-attention modules (diffusers PixArt `attn2`, ...).
    """

    method: str
    params: dict[str, Any] = field(default_factory=dict)
    layers: str | list[int] = "all"
    layer_params: dict[int, dict[str, Any]] = field(default_factory=dict)
    towers: list[str] | None = None
    include_cross_attention: bool = False

    def validated(self) -> "PatchConfig":
        """A copy with defaults filled in; raises PatchError naming the bad field and the fix."""
        params = resolve_params(self.method, dict(self.params))
        if self.layers != "all":
            if isinstance(self.layers, int) and not isinstance(self.layers, bool):
                layers = [self.layers]
            elif isinstance(self.layers, (list, tuple)) and all(
                isinstance(i, int) and not isinstance(i, bool) for i in self.layers
            ):
                layers = list(self.layers)
            else:
                raise PatchError(f"layers must be 'all' or a list of layer indices, got {self.layers!r}")
            if not layers:
                raise PatchError("layers is an empty list; pass 'all' or at least one layer index")
        else:
            layers = "all"
        if not isinstance(self.layer_params, dict):
            raise PatchError(f"layer_params must be a dict {{layer: {{param: value}}}}, got {self.layer_params!r}")
        layer_params = {}
        for key, overrides in self.layer_params.items():
            try:
                index = int(key)
            except (TypeError, ValueError):
                raise PatchError(f"layer_params keys must be layer indices, got {key!r}") from None
            if not isinstance(overrides, dict):
                raise PatchError(f"layer_params[{key!r}] must be a dict of parameter overrides, got {overrides!r}")
            if layers != "all" and index not in layers:
                raise PatchError(f"layer_params overrides layer {index}, which layers={layers} does not select")
            layer_params[index] = resolve_params(self.method, {**params, **overrides})
            layer_params[index] = {k: v for k, v in layer_params[index].items() if k in overrides}
        towers = self.towers
        if towers is not None:
            if isinstance(towers, str):
                towers = [towers]
            if not towers or not all(isinstance(t, str) and t for t in towers):
                raise PatchError(f"towers must be None or a list of non-empty path substrings, got {self.towers!r}")
            towers = list(towers)
        return PatchConfig(self.method, params, layers, layer_params, towers, bool(self.include_cross_attention))

    def params_for_layer(self, layer: int, num_layers: int) -> dict[str, Any]:
        overrides = self.layer_params.get(layer, self.layer_params.get(layer - num_layers, {}))
        return {**self.params, **overrides}

    # --- serialisation
    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "params": dict(self.params),
            "layers": self.layers if self.layers == "all" else list(self.layers),
            "layer_params": {str(k): dict(v) for k, v in self.layer_params.items()},
            "towers": None if self.towers is None else list(self.towers),
            "include_cross_attention": self.include_cross_attention,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "PatchConfig":
        if not isinstance(data, dict) or "method" not in data:
            raise PatchError(f"a patch config needs at least a 'method' field, got {data!r}")
        known = {"method", "params", "layers", "layer_params", "towers", "include_cross_attention"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PatchError(f"unknown patch config field(s) {unknown}; fields: {sorted(known)}")
        return cls(
            method=data["method"],
            params=dict(data.get("params") or {}),
            layers=data.get("layers", "all"),
            layer_params={int(k): dict(v) for k, v in (data.get("layer_params") or {}).items()},
            towers=data.get("towers"),
            include_cross_attention=bool(data.get("include_cross_attention", False)),
        ).validated()

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> "PatchConfig":
        return cls.from_dict(json.loads(text))


# method specs: the command line's (and JSON files') way to name a PatchConfig


def parse_method_spec(spec: str) -> PatchConfig | None:
    """'dense' -> None; 'sliding_window:window=64,sinks=4' -> PatchConfig (values parsed as
    int, float, bool or string; a list of integers as 4/4/8/8); a path to a .json file -> the
    PatchConfig saved in it (per-layer settings from a calibration, e.g. calibrate_act)."""
    spec = spec.strip()
    if spec in ("dense", "none", "baseline"):
        return None
    if spec.endswith(".json"):
        path = Path(spec)
        if not path.is_file():
            raise PatchError(f"method spec {spec!r} names a JSON patch config, but there is no such file")
        return PatchConfig.from_json(path.read_text())
    name, _, rest = spec.partition(":")
    params = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"bad parameter {item!r} in {spec!r}: expected key=value")
        params[key.strip()] = parse_value(value.strip())
    return PatchConfig(name.strip(), params).validated()


def parse_value(text: str):
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    if "/" in text:  # list parameters: per-head budgets 4/4/8/8, a grid 32/48
        try:
            return [int(part) for part in text.split("/")]
        except ValueError:
            pass
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def describe(config: PatchConfig | None) -> str:
    if config is None:
        return "dense"
    params = ",".join(f"{k}={'/'.join(map(str, v)) if isinstance(v, list) else v}"
                      for k, v in config.params.items() if v is not None)
    return f"{config.method}({params})" if params else config.method
