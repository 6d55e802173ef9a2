"""Decode speed of KV-compressed caches against dense SDPA and the attention-free floor, one run.

    python eval/benchmarks/kv_decode_speed.py --contexts 1024 16384 --out eval/results/kv-decode-speed

For each context length: a random prompt prefilled once per row (the KV methods compress it then),
then `--new-tokens` greedy steps of every row in turn (one step each, alternating, so the machine's
noise falls on all rows alike); tokens/s = 1 / the median step (prefill excluded). Rows:
- dense: the unpatched model, transformers' own DynamicCache;
- floor: the same model whose attention returns the current token's value and which keeps no cache
  (what decoding would cost if attention and its cache cost nothing);
- each KV method at `--compression`, its cache bytes read from the cache tensors; any other method
  given (linear, lolcats, sliding_window: their decoding caches are a state or a window) as it is.
Writes decode_speed.json / .md / .png into --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

from attnpatch import patch_model
from attnpatch.config import parse_method_spec
from attnpatch.evaluation.report import environment
from attnpatch.evaluation.speed import decode_speed_side_by_side
from attnpatch.models import load_default_model

@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 16384])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--compression", type=float, default=0.75)
    parser.add_argument("--methods", nargs="+", default=["snapkv", "keydiff", "tova", "streaming"])
    parser.add_argument("--out", type=Path, default=Path("eval/results/kv-decode-speed"))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, _ = load_default_model()
    model.eval()
    contenders, params = {"dense": model, "floor": model}, {}
    for spec in args.methods:  # each method on its own copy, so their steps can alternate
        config = parse_method_spec(spec)
        takes_compression = "compression" in config.params  # the KV methods; linear, lolcats, windows do not
        if takes_compression and "compression=" not in spec and "budget=" not in spec:
            config.params["compression"] = args.compression
        contenders[spec] = patch_model(copy.deepcopy(model), config)
        params[spec] = config.params
    rows = []
    for context in args.contexts:
        print(f"context {context}", flush=True)
        measured = decode_speed_side_by_side(contenders, context, args.new_tokens, floor="floor")
        dense, floor = measured["dense"], measured["floor"]
        for name, row in measured.items():
            row.update(method=name, vs_dense=row["decode_tokens_per_s"] / dense["decode_tokens_per_s"],
                       vs_floor=row["decode_tokens_per_s"] / floor["decode_tokens_per_s"],
                       kv_vs_dense=row["kv_bytes"] / dense["kv_bytes"], **({"params": params[name]} if name in params else {}))
            rows.append(row)
            print(f"  {name:<10} {row['decode_tokens_per_s']:7.2f} tok/s  {row['vs_dense']:.2f}x dense  "
                  f"{row['vs_floor']:.2f}x floor  KV {row['kv_vs_dense']:.3f}", flush=True)
        write(rows, args)  # after every context: a long run that stops early keeps what it measured


def write(rows, args) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"command": " ".join(["python", *sys.argv]), "environment": environment(0), "compression": args.compression, "new_tokens": args.new_tokens, "rows": rows}
    (args.out / "decode_speed.json").write_text(json.dumps(result, indent=1))
    lines = [f"Decode tokens/s after a prefill of each context (greedy, {args.new_tokens} tokens, prefill excluded), "
             f"KV methods at compression {args.compression}; the rows' steps alternate in one run, tokens/s = 1 / median step.", "",
             "| context | method | tok/s | vs dense | vs floor | KV bytes | KV vs dense |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['prompt_tokens']} | {r['method']} | {r['decode_tokens_per_s']:.2f} | {r['vs_dense']:.2f}x "
                     f"| {r['vs_floor']:.2f}x | {r['kv_bytes']:,} | {r['kv_vs_dense']:.3f} |")
    (args.out / "decode_speed.md").write_text("\n".join(lines) + "\n")
    plot(rows, args.out / "decode_speed.png")


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
           title=f"SmolLM2-135M decode speed, {torch.get_num_threads()} CPU thread(s)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
