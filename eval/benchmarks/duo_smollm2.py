"""duo_heads (DuoAttention) on SmolLM2-135M: learn per-kv-head gates on synthetic passkey prompts
(model frozen), then passkey accuracy and KV-cache bytes for several shares of retrieval heads
against dense attention and an all-streaming cache (sinks + window for every head).

    python eval/benchmarks/duo_smollm2.py          # ~30 min on 2 CPU cores
Writes eval/results/duo-smollm2/{results.md, results.json, gates.png}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from attnpatch import cache_kwargs, cache_nbytes, patch_model, unpatch_model
from attnpatch.analysis.duo_training import passkey_batches, train_duo_heads
from attnpatch.evaluation.retrieval import evaluate_retrieval, make_cases
from attnpatch.models import load_default_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-prompts", type=int, default=8)
    parser.add_argument("--train-length", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--l1", type=float, default=0.05)
    parser.add_argument("--sinks", type=int, default=16)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--bytes-length", type=int, default=4096)
    parser.add_argument("--out", default="eval/results/duo-smollm2")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_default_model()
    model.eval()
    results: dict = {"setup": vars(args), "rows": []}

    t0 = time.perf_counter()
    # training prompts come from another seed than the evaluation cases
    batches = passkey_batches(tokenizer, args.train_prompts, args.train_length, seed=1234)
    calibration = train_duo_heads(model, batches, sinks=args.sinks, window=args.window, steps=args.steps, lr=args.lr,
                                  l1=args.l1, supervise=32)
    results["training_seconds"] = time.perf_counter() - t0
    results["history"] = calibration.history
    torch.save(calibration.gates, out / "gates.pt")
    plot_gates(calibration, out / "gates.png")

    cases = make_cases(tokenizer, "passkey", args.lengths, args.depths, samples=1, seed=0)
    probe = tokenizer(make_cases(tokenizer, "passkey", [args.bytes_length], [0.5], seed=7)[0].prompt,
                      return_tensors="pt").input_ids

    def kv_bytes() -> int:
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=probe, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
        return cache_nbytes(cache)

    settings = [("dense", None, None)]
    settings += [(f"duo_heads, {round(r * 100)}% retrieval", calibration.config(retrieval_ratio=r), r)
                 for r in args.ratios]
    settings.append(("all streaming (sinks + window)", calibration.config(retrieval_ratio=0.0), 0.0))
    dense_bytes = None
    for label, config, ratio in settings:
        if config is not None:
            patch_model(model, config)
        result = evaluate_retrieval(model, tokenizer, cases)
        nbytes = kv_bytes()
        dense_bytes = dense_bytes or nbytes
        if config is not None:
            unpatch_model(model)
        row = {"setting": label, "retrieval_ratio": ratio, "accuracy": result.accuracy, "grid": result.as_dict()["grid"],
               "kv_bytes": nbytes, "kv_vs_dense": nbytes / dense_bytes, "seconds": result.seconds}
        results["rows"].append(row)
        print(f"{label}: passkey {result.accuracy:.2f}, KV {nbytes / 2**20:.1f} MiB ({row['kv_vs_dense']:.2f} of dense)")
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_report(results, calibration, out)


def plot_gates(calibration, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3.6, 6))
    image = ax.imshow(calibration.gates.numpy(), aspect="auto", cmap="magma", vmin=0, vmax=1)
    ax.set_xlabel("kv head")
    ax.set_ylabel("layer")
    ax.set_title("duo_heads gates (1 = retrieval)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: dict, calibration, out: Path) -> None:
    setup = results["setup"]
    first, last = results["history"][0], results["history"][-1]
    lines = [
        "# duo_heads (DuoAttention) on SmolLM2-135M",
        "",
        f"Gates: {setup['train_prompts']} synthetic passkey prompts of ~{setup['train_length']} tokens, "
        f"{setup['steps']} Adam steps (lr {setup['lr']}, L1 {setup['l1']}), model frozen, "
        f"{results['training_seconds']:.0f} s; distillation loss {first[1]:.4f} -> {last[1]:.4f}, mean gate "
        f"{first[2]:.3f} -> {last[2]:.3f}. Streaming heads: {setup['sinks']} sinks + {setup['window']}-token window.",
        "",
        f"Passkey accuracy over lengths {setup['lengths']} x depths {setup['depths']} (one prompt each, other seed "
        f"than training); KV bytes after prefilling a {setup['bytes_length']}-token prompt.",
        "",
        "| setting | passkey accuracy | " + " | ".join(f"{n} tokens" for n in setup["lengths"]) +
        " | KV MiB | KV vs dense |",
        "|---|---|" + "---|" * len(setup["lengths"]) + "---|---|",
    ]
    for row in results["rows"]:
        per_length = [sum(d.values()) / len(d) for d in row["grid"].values()]
        lines.append(f"| {row['setting']} | {row['accuracy']:.2f} | " + " | ".join(f"{a:.2f}" for a in per_length)
                     + f" | {row['kv_bytes'] / 2**20:.1f} | {row['kv_vs_dense']:.2f} |")
    lines += ["", "## Learnt gates (layers x kv heads)", "", calibration.table(), ""]
    (out / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
