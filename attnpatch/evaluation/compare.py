"""The CLI's main job (`attnpatch compare`): perplexity, tokens/s and peak memory, dense vs patched,
in one run."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..api import patch_model, unpatch_model
from ..config import describe, parse_method_spec
from .perplexity import windowed_perplexity


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
