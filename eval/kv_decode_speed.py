"""Decode speed of KV-compressed caches against dense SDPA and the attention-free floor, one run.

    python eval/kv_decode_speed.py --contexts 1024 16384 --out eval/results/kv-decode-speed

For each context length: a random prompt prefilled once per method (the KV methods compress it
then), followed by `--new-tokens` greedy steps, timed (prefill excluded). Rows:
- dense: the unpatched model, transformers' own DynamicCache;
- floor: the same model whose attention returns the current token's value and which keeps no cache
  (what decoding would cost if attention and its cache cost nothing);
- each KV method at `--compression`, its cache bytes read from the cache tensors.
Writes decode_speed.json / .md / .png into --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AttentionInterface

from attnpatch import patch_model, unpatch_model
from attnpatch.config import parse_method_spec
from attnpatch.evaluation.report import environment
from attnpatch.evaluation.speed import _random_ids, decode_speed
from attnpatch.models import load_default_model

FLOOR = "attnpatch_floor"


def floor_attention(module, query, key, value, attention_mask, **kwargs):
    """Attention that costs nothing: each query's output is its own token's value."""
    groups = query.shape[1] // value.shape[1]
    return value[:, :, -query.shape[2]:].repeat_interleave(groups, 1).transpose(1, 2).contiguous(), None


@torch.no_grad()
def floor_decode_speed(model, prompt_tokens: int, new_tokens: int) -> dict:
    """Greedy steps with no cache and attention returning V, at the positions dense would use."""
    AttentionInterface.register(FLOOR, floor_attention)
    previous = model.config._attn_implementation
    model.set_attn_implementation(FLOOR)
    try:
        token = _random_ids(model, 1, 0)
        t0 = time.perf_counter()
        for step in range(new_tokens):
            out = model(input_ids=token, position_ids=torch.tensor([[prompt_tokens + step]]), use_cache=False)
            token = out.logits[:, -1:].argmax(-1)
        seconds = time.perf_counter() - t0
    finally:
        model.set_attn_implementation(previous)
    return {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "decode_tokens_per_s": new_tokens / seconds,
            "kv_bytes": 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 16384])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--compression", type=float, default=0.75)
    parser.add_argument("--methods", nargs="+", default=["snapkv", "knorm", "tova", "streaming"])
    parser.add_argument("--out", type=Path, default=Path("eval/results/kv-decode-speed"))
    args = parser.parse_args()
    torch.manual_seed(0)
    model, _ = load_default_model()
    model.eval()
    rows = []
    for context in args.contexts:
        print(f"context {context}", flush=True)
        dense = decode_speed(model, prompt_tokens=context, new_tokens=args.new_tokens)
        floor = floor_decode_speed(model, context, args.new_tokens)
        rows += [dict(dense, method="dense"), dict(floor, method="floor")]
        for spec in args.methods:
            config = parse_method_spec(spec)
            if "compression=" not in spec and "budget=" not in spec:
                config.params["compression"] = args.compression
            patch_model(model, config)
            try:
                rows.append(dict(decode_speed(model, prompt_tokens=context, new_tokens=args.new_tokens),
                                 method=spec, params=config.params))
            finally:
                unpatch_model(model)
        for row in rows:
            if row["prompt_tokens"] == context:
                row["vs_dense"] = row["decode_tokens_per_s"] / dense["decode_tokens_per_s"]
                row["vs_floor"] = row["decode_tokens_per_s"] / floor["decode_tokens_per_s"]
                row["kv_vs_dense"] = row["kv_bytes"] / dense["kv_bytes"]
                print(f"  {row['method']:<10} {row['decode_tokens_per_s']:7.2f} tok/s  {row['vs_dense']:.2f}x dense  "
                      f"{row['vs_floor']:.2f}x floor  KV {row['kv_vs_dense']:.3f}", flush=True)
    write(rows, args)


def write(rows, args) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"environment": environment(0), "compression": args.compression, "new_tokens": args.new_tokens, "rows": rows}
    (args.out / "decode_speed.json").write_text(json.dumps(result, indent=1))
    lines = [f"Decode tokens/s after a prefill of each context (greedy, {args.new_tokens} tokens, prefill excluded), "
             f"KV methods at compression {args.compression}; ratios are within one run.", "",
             "| context | method | tok/s | vs dense | vs floor | KV bytes | KV vs dense |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['prompt_tokens']} | {r['method']} | {r['decode_tokens_per_s']:.2f} | {r['vs_dense']:.2f}x "
                     f"| {r['vs_floor']:.2f}x | {r['kv_bytes']:,} | {r['kv_vs_dense']:.3f} |")
    (args.out / "decode_speed.md").write_text("\n".join(lines) + "\n")
    plot(rows, args.out / "decode_speed.png")
    print("\n".join(lines))


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        ax.plot([r["prompt_tokens"] for r in mine], [r["decode_tokens_per_s"] for r in mine],
                "o--" if method in ("dense", "floor") else "o-", label=method)
    ax.set(xscale="log", yscale="log", xlabel="context before decoding (tokens)", ylabel="decode tokens / s",
           title="SmolLM2-135M decode speed, 2 CPU threads")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
