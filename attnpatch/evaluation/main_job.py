"""`attnpatch compare`, the main job: one training-free setting per family beside dense, each scored
on what it is for, in one run on the same text.

Every row: quality = perplexity of the `decode_tokens` that follow a `prompt_tokens` prompt of real
text, scored one token at a time through the model's cache (so a KV method is judged on the cache it
compressed, a sparse prefill on the cache it wrote); the KV cache's bytes at the end, read from its
tensors; the latency of one `prefill_tokens` prefill into a cache (last logits only, best of
`repeats`); and decode tokens/s after a `prompt_tokens` prompt, every row's greedy steps alternating
in one loop (`decode_speed_side_by_side`, on a patched copy of the model per row), so the machine's
noise falls on all rows alike. Speeds are ratios to dense measured in the same run. Checkpoints
written by save_patched or a recipe (`final/`) join as rows of their own, measured the same way.
"""

from __future__ import annotations

from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..api import patch_model, unpatch_model
from ..api.contexts import prefill_cache
from ..config import describe, parse_method_spec
from .perplexity import decoding_perplexity
from .speed import best_seconds, decode_speed_side_by_side, random_ids

# (spec, what the row shows); the KV method at 0.75 evicted keeps the cache under half of dense's
# bytes after decoding too (SnapKV's cache grows again while decoding)
DEFAULT_ROWS = [
    ("dense", "the model as loaded (SDPA)"),
    ("block_topk", "sparse prefill: the 8 best 64-token key blocks per query block"),
    ("sliding_window:window=256,sinks=4", "sparse: 256 recent tokens plus 4 attention sinks (StreamingLLM's lesson)"),
    ("snapkv:compression=0.75", "KV eviction: 75% of the prompt's cache entries dropped"),
    ("kv_quant:bits=4", "KV quantisation: 4-bit keys and values (KIVI)"),
]


@dataclass
class JobSettings:
    prompt_tokens: int = 1536
    decode_tokens: int = 256
    prefill_tokens: int = 4096
    repeats: int = 2
    speed_steps: int = 32  # interleaved decoding steps per row for the decode speed


@torch.no_grad()
def prefill_seconds(model, tokens: int, repeats: int) -> float:
    """One prefill into a new cache, last logits only: what generation pays before its first token
    (a KV method compresses the cache within it)."""
    ids = random_ids(model, tokens, seed=tokens)
    prefill_cache(model, ids[:, :256])  # warm-up, cheap
    return best_seconds(lambda: prefill_cache(model, ids), repeats)


def measure(model, text_ids: torch.Tensor, settings: JobSettings, label: str) -> dict:
    """One row: decoding perplexity, KV bytes and prefill seconds of `model` as it is."""
    total = settings.prompt_tokens + settings.decode_tokens
    decoded = decoding_perplexity(model, text_ids, max_tokens=total, prefill=settings.prompt_tokens,
                                  desc=f"{label}: decoding", progress=True)
    return {"perplexity": decoded.perplexity, "kv_bytes": decoded.extra["cache_bytes"],
            "prefill_seconds": prefill_seconds(model, settings.prefill_tokens, settings.repeats)}


def interleaved_decode_speed(model, configs: dict, checkpoints: dict, settings: JobSettings) -> dict[str, float]:
    """Decode tokens/s of every row, their steps alternating in one loop: a patched copy of `model`
    per method row, the loaded checkpoints as they are."""
    contenders = {}
    for label, config in configs.items():  # `model` is unpatched here: the dense row needs no copy
        contenders[label] = model if config is None else patch_model(deepcopy(model), config)
    contenders.update(checkpoints)
    rows = decode_speed_side_by_side(contenders, settings.prompt_tokens, settings.speed_steps)
    return {label: row["decode_tokens_per_s"] for label, row in rows.items()}


def main_job(model, text_ids: torch.Tensor, specs: list[str] | None = None, checkpoints: list[str] = (),
             settings: JobSettings | None = None, notes: dict[str, str] | None = None) -> list[dict]:
    """Rows for dense, each method spec (patched in turn, unpatched after) and each checkpoint."""
    from ..models import load_model

    settings = settings or JobSettings()
    if text_ids.numel() < settings.prompt_tokens + settings.decode_tokens:
        raise ValueError(f"the text has {text_ids.numel()} tokens; the job scores {settings.prompt_tokens} + "
                         f"{settings.decode_tokens}: pass a longer text or lower --prompt-tokens / --decode-tokens")
    notes = dict(DEFAULT_ROWS) if notes is None else notes
    specs = [spec for spec, _ in DEFAULT_ROWS] if specs is None else list(specs)
    if "dense" not in specs:
        specs.insert(0, "dense")
    rows, configs, loaded = [], {}, {}
    for spec in tqdm(specs, desc="settings"):
        config = configs[spec] = parse_method_spec(spec)
        if config is not None:
            patch_model(model, config)
        try:
            row = measure(model, text_ids, settings, spec)
        finally:
            if config is not None:
                unpatch_model(model)
        rows.append({"setting": spec, "config": describe(config), "note": notes.get(spec, ""), **row})
    for path in checkpoints:
        label = f"checkpoint {Path(path).parent.name}/{Path(path).name}"
        loaded[label], _ = load_model(str(path))
        loaded[label].eval()
        rows.append({"setting": label, "config": str(path), "note": "a saved patched model (load_patched)",
                     **measure(loaded[label], text_ids, settings, str(path))})
    speeds = interleaved_decode_speed(model, configs, loaded, settings)
    for row in rows:
        row["decode_tokens_per_s"] = speeds[row["setting"]]
    dense = next(row for row in rows if row["setting"] == "dense")  # wherever --methods put it
    for row in rows:
        row["kv_vs_dense"] = row["kv_bytes"] / dense["kv_bytes"]
        row["perplexity_vs_dense"] = row["perplexity"] / dense["perplexity"]
        row["decode_speedup"] = row["decode_tokens_per_s"] / dense["decode_tokens_per_s"]
        row["prefill_speedup"] = dense["prefill_seconds"] / row["prefill_seconds"]
    return rows


def format_rows(rows: list[dict], settings: JobSettings) -> str:
    """A markdown table: quality, KV bytes, decode and prefill speed, each beside dense."""
    head = (f"| setting | perplexity ({settings.decode_tokens} tokens after {settings.prompt_tokens}) | vs dense | "
            f"KV cache MiB | vs dense | decode tok/s | vs dense | {settings.prefill_tokens}-token prefill s | "
            "speed-up | what it is |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['perplexity']:.2f} | {r['perplexity_vs_dense']:.2f}x | "
                     f"{r['kv_bytes'] / 2**20:.1f} | {r['kv_vs_dense']:.2f} | {r['decode_tokens_per_s']:.1f} | "
                     f"{r['decode_speedup']:.2f}x | {r['prefill_seconds']:.2f} | {r['prefill_speedup']:.2f}x | "
                     f"{r['note']} |")
    return "\n".join(lines)


def plot_rows(rows: list[dict], path: str | Path) -> Path:
    """Quality against KV bytes (left) and prefill / decode speed-ups (right), dense at 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        left.scatter(r["kv_vs_dense"], r["perplexity"], s=40)
        left.annotate(r["setting"], (r["kv_vs_dense"], r["perplexity"]), fontsize=7, xytext=(4, 3),
                      textcoords="offset points")
    left.set_xlabel("KV cache bytes / dense")
    left.set_ylabel("perplexity (lower is better)")
    left.set_title("quality vs memory held")
    left.grid(alpha=0.3)
    names = [r["setting"] for r in rows]
    x = torch.arange(len(rows)).tolist()
    right.bar([i - 0.2 for i in x], [r["prefill_speedup"] for r in rows], width=0.4, label="prefill")
    right.bar([i + 0.2 for i in x], [r["decode_speedup"] for r in rows], width=0.4, label="decode")
    right.axhline(1.0, color="grey", lw=0.8)
    right.set_xticks(x, names, rotation=25, ha="right", fontsize=7)
    right.set_ylabel("speed / dense")
    right.set_title("speed, measured in the same run")
    right.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(rows: list[dict], settings: JobSettings, out: Path, model: str, text: str, footer: str) -> str:
    """compare.md (the table and `footer`), compare.json and compare.png in `out`; returns the table."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    table = format_rows(rows, settings)
    (out / "compare.md").write_text(f"# attnpatch compare: {model}\n\n{table}\n\n{footer}\n")
    (out / "compare.json").write_text(json.dumps({"model": model, "text": text, "settings": vars(settings),
                                                  "rows": rows}, indent=2) + "\n")
    try:
        plot_rows(rows, out / "compare.png")
    except ImportError:
        print("compare.png not drawn: matplotlib is missing (pip install 'attnpatch[plots]')")
    return table
