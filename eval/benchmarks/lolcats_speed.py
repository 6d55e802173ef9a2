"""Speed of a converted (lolcats) model against dense SDPA, measured in one run on this machine.

    python eval/benchmarks/lolcats_speed.py --converted out/smollm2-lolcats/final --out eval/results/lolcats-smollm2

Prefill: one forward over random tokens at each length (best of `--repeats`). Decoding: greedy
steps after prompts of growing length, with tokens/s, KV/state bytes read from the cache object
and peak memory. Dense is the original SmolLM2 (exact SDPA); the converted model is loaded with
`load_patched` (its trained feature maps and gates; the cost does not depend on the values).
Writes speed.json, speed.md and speed.png into --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from attnpatch import load_patched
from attnpatch.evaluation.report import environment
from attnpatch.evaluation.speed import decode_speed, prefill_latency
from attnpatch.models import load_default_model


def measure(model, args) -> dict:
    prefill = prefill_latency(model, args.prefill_lengths, repeats=args.repeats)
    decode = [decode_speed(model, prompt_tokens=n, new_tokens=args.new_tokens) for n in args.decode_prompts]
    return {"prefill": prefill, "decode": decode}


def table(results: dict) -> str:
    dense, conv = results["dense"], results["converted"]
    lines = ["| prefill tokens | dense s | converted s | converted / dense |", "|---|---|---|---|"]
    for d, c in zip(dense["prefill"], conv["prefill"]):
        lines.append(f"| {d['tokens']} | {d['seconds']:.2f} | {c['seconds']:.2f} | {c['seconds'] / d['seconds']:.2f} |")
    lines += ["", "| context before decoding | dense tok/s | converted tok/s | dense KV bytes | converted cache bytes "
              "| bytes ratio | dense peak MB | converted peak MB |", "|---|---|---|---|---|---|---|---|"]
    for d, c in zip(dense["decode"], conv["decode"]):
        lines.append(f"| {d['prompt_tokens']} | {d['decode_tokens_per_s']:.1f} | {c['decode_tokens_per_s']:.1f} "
                     f"| {d['kv_bytes']:,} | {c['kv_bytes']:,} | {c['kv_bytes'] / d['kv_bytes']:.3f} "
                     f"| {d['peak_mb']:.0f} | {c['peak_mb']:.0f} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for label, style in (("dense", "o-"), ("converted", "s-")):
        rows = results[label]
        axes[0].plot([r["tokens"] for r in rows["prefill"]], [r["seconds"] for r in rows["prefill"]], style, label=label)
        prompts = [r["prompt_tokens"] for r in rows["decode"]]
        axes[1].plot(prompts, [r["decode_tokens_per_s"] for r in rows["decode"]], style, label=label)
        axes[2].plot(prompts, [r["kv_bytes"] / 2**20 for r in rows["decode"]], style, label=label)
    axes[0].set(xscale="log", yscale="log", xlabel="prompt tokens", ylabel="prefill seconds", title="prefill")
    axes[1].set(xscale="log", xlabel="context before decoding", ylabel="tokens / s", title="decode speed")
    axes[2].set(xscale="log", xlabel="context before decoding", ylabel="MiB", title="KV cache / state")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(results["title"])
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--converted", default="out/smollm2-lolcats/final", help="folder written by a recipe")
    parser.add_argument("--out", default="eval/results/lolcats-smollm2")
    parser.add_argument("--prefill-lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--decode-prompts", type=int, nargs="+", default=[512, 2048, 8192, 16384])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"environment": environment(0), "settings": vars(args),
               "title": f"dense SmolLM2-135M vs converted ({args.converted}), {torch.get_num_threads()} threads"}
    dense, _ = load_default_model()
    results["dense"] = measure(dense.eval(), args)
    del dense
    results["converted"] = measure(load_patched(args.converted).eval(), args)
    (out / "speed.json").write_text(json.dumps(results, indent=1))
    text = table(results)
    (out / "speed.md").write_text(f"# {results['title']}\n\n{text}\n")
    plot(results, out / "speed.png")
    print(text)


if __name__ == "__main__":
    main()
