"""The CLI's main job: perplexity, tokens/s and peak memory, dense vs patched, in one run."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from .api import patch_model, unpatch_model
from .config import PatchConfig
from .errors import PatchError
from .evaluation.data import load_text  # noqa: F401  (re-exported for callers of the main job)
from .evaluation.memory import peak_memory  # noqa: F401
from .evaluation.perplexity import windowed_perplexity

# ----------------------------------------------------------------------------- method specs


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


def compare(model, input_ids: torch.Tensor, specs: list[str], window: int = 1024, max_tokens: int | None = None,
            progress: bool = True) -> list[dict]:
    """Perplexity, tokens/s and peak memory for each method spec, dense measured in the same run."""
    rows = []
    for spec in tqdm(specs, desc="methods", disable=not progress):
        config = parse_method_spec(spec)
        if config is not None:
            patch_model(model, config)
        try:
            res = windowed_perplexity(model, input_ids, max_length=window, max_tokens=max_tokens,
                                      desc=describe(config), progress=progress)
        finally:
            if config is not None:
                unpatch_model(model)
        rows.append({"method": spec if config is not None else "dense", "config": describe(config),
                     "perplexity": res.perplexity, "tokens": res.tokens, "tokens_per_s": res.tokens_per_second,
                     "peak_mb": res.peak_bytes / 2**20, "seconds": res.seconds})
    dense = next((r for r in rows if r["method"] == "dense"), None)
    for row in rows:
        row["speed_vs_dense"] = row["tokens_per_s"] / dense["tokens_per_s"] if dense else float("nan")
    return rows


def format_table(rows: list[dict]) -> str:
    width = max(len("method"), *(len(r["method"]) for r in rows))
    head = f"{'method':<{width}} {'perplexity':>11} {'tokens/s':>9} {'vs dense':>9} {'peak MB':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['method']:<{width}} {r['perplexity']:>11.2f} {r['tokens_per_s']:>9.0f} "
                     f"{r['speed_vs_dense']:>8.2f}x {r['peak_mb']:>8.0f}")
    return "\n".join(lines)
