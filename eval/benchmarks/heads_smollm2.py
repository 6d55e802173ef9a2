"""Head pruning on SmolLM2-135M (30 layers x 9 query heads in 3 kv groups), no retraining:

1. head importance on WikiText-2 valid (gradient of head gates, output norm, attention focus):
   tables and heat maps;
2. WikiText-2 test perplexity against the fraction of heads removed, per score and random control
   (same fraction in every layer; whole kv groups; global ranking; greedy rescoring);
3. parameters and prefill latency of the pruned models against the dense model in the same run;
4. a pruned model saved with save_pretrained reloads in a fresh process with plain transformers.

    python eval/benchmarks/heads_smollm2.py            # ~25 min on 2 CPU cores
Writes eval/results/heads-smollm2/{results.md, results.json, importance_*.png, ppl_vs_pruned.png}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from attnpatch import greedy_head_pruning, head_importance, patch_model, unpatch_model
from attnpatch.evaluation.data import load_text
from attnpatch.evaluation.perplexity import windowed_perplexity
from attnpatch.evaluation.speed import best_seconds
from attnpatch.models import load_default_model

SCORES = ("gradient", "output_norm", "entropy", "random")


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def heads_removed(config) -> int:
    return sum(len(p["heads"]) for p in config.layer_params.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", type=int, default=16, help="calibration sequences")
    parser.add_argument("--calibration-length", type=int, default=256)
    parser.add_argument("--ppl-tokens", type=int, default=16384)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--heads-per-layer", type=int, nargs="+", default=[1, 2, 3, 4, 5],
                        help="query heads removed per layer (of 9)")
    parser.add_argument("--speed-length", type=int, default=1024)
    parser.add_argument("--out", default="eval/results/heads-smollm2")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model, tokenizer = load_default_model()
    model.eval()
    valid = tokenizer(load_text(split="valid")[0], return_tensors="pt").input_ids[0]
    test = tokenizer(load_text(split="test")[0], return_tensors="pt").input_ids[0][: args.ppl_tokens]
    length = args.calibration_length
    batches = [valid[i * length:(i + 1) * length][None] for i in range(args.calibration)]

    def ppl() -> float:
        return windowed_perplexity(model, test, max_length=args.window, progress=False).perplexity

    results: dict = {"setup": vars(args), "rows": []}
    t0 = time.perf_counter()
    importance = head_importance(model, batches)
    results["importance_seconds"] = time.perf_counter() - t0
    torch.save(importance.scores, out / "importance.pt")
    importance.plot(out / "importance_heatmaps.png")
    dense_ppl = ppl()
    dense_params = n_params(model)
    results["dense"] = {"perplexity": dense_ppl, "params": dense_params}
    print(f"dense perplexity {dense_ppl:.2f}, {dense_params / 1e6:.2f}M parameters")

    def measure(label: str, config, **info) -> dict:
        patch_model(model, config)
        row = {"setting": label, "heads_removed": heads_removed(config), "perplexity": ppl(),
               "params": n_params(model), **info}
        unpatch_model(model)
        results["rows"].append(row)
        print(f"{label}: removed {row['heads_removed']} heads, ppl {row['perplexity']:.2f}")
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        return row

    for per_layer in args.heads_per_layer:
        ratio = per_layer / 9
        for score in SCORES:
            measure(f"{score}, layer", importance.plan(ratio, score=score, scope="layer"), score=score,
                    scope="layer", unit="query", fraction=ratio)
        measure("gradient, global", importance.plan(ratio, score="gradient", scope="global"), score="gradient",
                scope="global", unit="query", fraction=ratio)
    for per_group in (1, 2):  # the same number of query heads from every kv group: no zero padding
        ratio = per_group / 3
        for score in ("gradient", "output_norm", "random"):
            measure(f"{score}, layer, balanced", importance.plan(ratio, score=score, balanced=True), score=score,
                    scope="layer", unit="query", balanced=True, fraction=ratio)
    for groups in (1, 2):  # whole kv groups (of 3): kv heads and their query heads go
        ratio = groups / 3
        for score in ("gradient", "output_norm", "random"):
            measure(f"{score}, kv groups", importance.plan(ratio, score=score, scope="layer", unit="group"),
                    score=score, scope="layer", unit="group", fraction=ratio)
    for per_layer in (3, 5):
        ratio = per_layer / 9
        config, _ = greedy_head_pruning(model, batches, ratio=ratio, steps=3, score="gradient", scope="global",
                                        progress=False)
        measure("gradient, greedy global (3 rounds)", config, score="gradient", scope="global", unit="query",
                fraction=ratio)

    # --- parameters and prefill latency against dense in the same run
    ids = torch.randint(100, 40000, (1, args.speed_length))

    def latency() -> float:
        with torch.no_grad():
            return best_seconds(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1), repeats=5)

    dense_seconds = latency()
    speed = [{"setting": "dense", "params": dense_params, "seconds": dense_seconds, "speedup": 1.0}]
    for label, config in (("1 of 3 kv groups per layer", importance.plan(1 / 3, unit="group")),
                          ("2 of 3 kv groups per layer", importance.plan(2 / 3, unit="group")),
                          ("1 of 3 query heads per kv group", importance.plan(1 / 3, balanced=True)),
                          ("3 of 9 query heads per layer (unbalanced)", importance.plan(3 / 9)),
                          ("3 of 9 query heads, global", importance.plan(3 / 9, scope="global"))):
        patch_model(model, config)
        seconds = latency()
        speed.append({"setting": label, "params": n_params(model), "seconds": seconds,
                      "speedup": dense_seconds / seconds,
                      "attention_params": sum(p.numel() for n, p in model.named_parameters() if "self_attn" in n)})
        unpatch_model(model)
    dense_seconds_after = latency()  # noise check: dense measured again at the end
    results["speed"] = {"length": args.speed_length, "rows": speed, "dense_seconds_again": dense_seconds_after}

    # --- a pruned model saved with save_pretrained reloads in a fresh process (plain transformers)
    config = importance.plan(3 / 9, unit="group")
    patch_model(model, config)
    probe = test[:64][None]
    with torch.no_grad():
        expected = model(input_ids=probe).logits
    folder = Path(tempfile.mkdtemp())
    model.save_pretrained(folder)
    torch.save({"input_ids": probe, "logits": expected}, folder / "probe.pt")
    unpatch_model(model)
    script = ("import torch, json, sys; from transformers import AutoModelForCausalLM; "
              f"m = AutoModelForCausalLM.from_pretrained({str(folder)!r}).eval(); "
              f"p = torch.load({str(folder / 'probe.pt')!r}); "
              "d = (m(input_ids=p['input_ids']).logits - p['logits']).abs().max().item(); "
              "print(json.dumps({'max_abs_diff': d, 'params': sum(x.numel() for x in m.parameters()), "
              "'heads': m.config.num_attention_heads, 'kv_heads': m.config.num_key_value_heads}))")
    env_free = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    results["fresh_process_reload"] = json.loads(env_free.stdout.strip().splitlines()[-1])
    print("fresh-process reload:", results["fresh_process_reload"])
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_report(results, importance, out)


def write_report(results: dict, importance, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setup, rows, dense = results["setup"], results["rows"], results["dense"]
    lines = [
        "# Head pruning on SmolLM2-135M, no retraining",
        "",
        f"Importance from {setup['calibration']} WikiText-2 valid sequences of {setup['calibration_length']} tokens "
        f"({results['importance_seconds']:.0f} s). Perplexity: WikiText-2 test, {setup['ppl_tokens']} tokens in "
        f"{setup['window']}-token windows. Dense: {dense['perplexity']:.2f}, {dense['params'] / 1e6:.2f}M parameters. "
        "270 query heads in all (30 layers x 9, kv groups of 3).",
        "",
        "## Perplexity vs heads removed",
        "",
        "| setting | heads removed | fraction | perplexity | parameters (M) |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['setting']} | {row['heads_removed']} | {row['heads_removed'] / 270:.2f} | "
                     f"{row['perplexity']:.2f} | {row['params'] / 1e6:.2f} |")
    speed = results["speed"]
    lines += ["", f"## Parameters and prefill latency ({speed['length']} tokens, best of 5, same run)", "",
              "| setting | parameters (M) | attention parameters (M) | seconds | speed-up vs dense |", "|---|---|---|---|---|"]
    for row in speed["rows"]:
        attention = row.get("attention_params")
        lines.append(f"| {row['setting']} | {row['params'] / 1e6:.2f} | "
                     f"{'' if attention is None else f'{attention / 1e6:.2f}'} | {row['seconds']:.3f} | "
                     f"{row['speedup']:.2f}x |")
    lines.append(f"\nDense measured again at the end: {speed['dense_seconds_again']:.3f} s.")
    reload = results["fresh_process_reload"]
    lines += ["", "## Plain reload in a fresh process", "",
              f"1 of 3 kv groups removed per layer, `save_pretrained`, then `AutoModelForCausalLM.from_pretrained` in "
              f"a new Python process: {reload['heads']} heads / {reload['kv_heads']} kv heads in the config, "
              f"{reload['params'] / 1e6:.2f}M parameters, max |logit difference| {reload['max_abs_diff']:.2e}.",
              "", "## Gradient importance (layers x query heads)", "", importance.table("gradient", digits=3), ""]
    (out / "results.md").write_text("\n".join(lines) + "\n")

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    settings = sorted({row["setting"] for row in rows}, key=lambda s: [r["setting"] for r in rows].index(s))
    colours = plt.get_cmap("tab20").colors
    for i, setting in enumerate(settings):
        points = sorted((r["heads_removed"] / 270, r["perplexity"]) for r in rows if r["setting"] == setting)
        ax.plot(*zip(*[(0.0, dense["perplexity"])] + points), marker="osD^v"[i % 5], color=colours[i % 20],
                label=setting)
    ax.set_yscale("log")
    ax.set_xlabel("fraction of query heads removed")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.set_title("SmolLM2-135M head pruning, no retraining")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "ppl_vs_pruned.png", dpi=120)
    plt.close(fig)


def rewrite_report(out: Path) -> None:
    """Tables and plot again from a finished run's results.json and importance.pt."""
    from attnpatch import HeadImportance

    results = json.loads((out / "results.json").read_text())
    scores = torch.load(out / "importance.pt")
    importance = HeadImportance(scores, {tower: 3 for tower in next(iter(scores.values()))},
                                results["setup"]["calibration"])
    importance.plot(out / "importance_heatmaps.png")
    write_report(results, importance, out)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--report-only"]:
        rewrite_report(Path(sys.argv[2] if len(sys.argv) > 2 else "eval/results/heads-smollm2"))
    else:
        main()
