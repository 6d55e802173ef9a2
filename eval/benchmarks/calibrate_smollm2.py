"""Per-head block top-k budgets calibrated on SmolLM2-135M vs one budget for every head, at the same
mean budget: WikiText-2 test perplexity in 2k-token windows.

    python eval/benchmarks/calibrate_smollm2.py --out eval/results/sparse-smollm2/calibration

Calibration runs once on WikiText-2 *validation* windows (held out from the test text scored) and
measures every layer's and kv head's recall curve. For each recall target three configs are
scored: "recall" (each head's smallest head_top_k reaching the target), "allocated" (the same
mean budget spent where it adds the most summed recall, `choose(mean_top_k=...)`) and "uniform"
(every head the mean, rounded): all three compute about the same number of blocks (measured
densities are reported). Writes calibration.json, calibration.md, budgets.png (heat maps) and the
configs (config-*.json).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from attnpatch import PatchConfig, calibrate_block_topk, patch_model, patched_methods, unpatch_model
from attnpatch.evaluation.data import load_text
from attnpatch.evaluation.perplexity import windowed_perplexity
from attnpatch.evaluation.report import environment
from attnpatch.models import load_model


def measured_ppl(model, ids, args, config=None) -> dict:
    if config is not None:
        patch_model(model, config)
    result = windowed_perplexity(model, ids, max_length=args.window, max_tokens=args.ppl_tokens, progress=True,
                                 desc="dense" if config is None else f"{config.method}")
    density = [m.last_density for m in patched_methods(model) if m.last_density is not None]
    if config is not None:
        unpatch_model(model)
    return {"perplexity": result.perplexity, "density": sum(density) / len(density) if density else 1.0}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(3.2 * len(results), 4.2), squeeze=False)
    for ax, r in zip(axes[0], results):
        budgets = torch.tensor([r["budgets"][str(layer)] for layer in sorted(map(int, r["budgets"]))])
        image = ax.imshow(budgets, aspect="auto", cmap="viridis")
        ax.set(title=f"recall {r['target']}: head_top_k", xlabel="kv head", ylabel="layer")
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_report(out: Path, args, dense: dict, rows: list[dict]) -> None:
    lines = ["# Calibrated per-head block top-k budgets vs one budget for all heads (SmolLM2-135M)", "",
             f"WikiText-2 test perplexity, {args.window}-token windows, {args.ppl_tokens} tokens; calibrated on "
             f"{args.calibration_windows} validation windows; blocks of {args.block}; 1 sink + 1 local block "
             f"always kept. Dense: **{dense['perplexity']:.2f}**.", "",
             "| recall target | head_top_k mean (min-max) | per-head by recall: ppl (density) "
             "| allocated, same mean: ppl (density) | uniform top_k | uniform: ppl (density) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        cell = lambda m: f"{r[m]['perplexity']:.2f} ({r[m]['density']:.3f})"  # noqa: E731
        lines.append(f"| {r['target']} | {r['mean_budget']:.2f} ({r['min_budget']}-{r['max_budget']}) "
                     f"| {cell('by_recall')} | {cell('allocated')} | {r['uniform_top_k']} | {cell('uniform')} |")
    for r in rows:
        lines += ["", f"## Budgets at recall {r['target']} (head_top_k (recall reached) per layer and kv head)", "",
                  r["table"]]
    (out / "calibration.md").write_text("\n".join(lines) + "\n")
    plot(rows, out / "budgets.png")
    print("\n".join(lines[:6 + len(rows)]))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="eval/results/sparse-smollm2/calibration")
    parser.add_argument("--recall", type=float, nargs="+", default=[0.8, 0.9])
    parser.add_argument("--window", type=int, default=2048)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--calibration-windows", type=int, default=4)
    parser.add_argument("--ppl-tokens", type=int, default=16384)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model, tokenizer = load_model()
    model.eval()
    valid_text, _ = load_text(split="valid")
    test_text, test_source = load_text(split="test")
    valid_ids = tokenizer(valid_text, return_tensors="pt").input_ids[0]
    test_ids = tokenizer(test_text, return_tensors="pt").input_ids[0]
    batches = [valid_ids[i * args.window : (i + 1) * args.window][None] for i in range(args.calibration_windows)]
    dense = measured_ppl(model, test_ids, args)
    rows = []
    calibration = calibrate_block_topk(model, batches, recall=args.recall[0], block_size=args.block)
    for recall in args.recall:
        by_recall = calibration.choose(recall=recall)
        mean = by_recall.mean_budget()
        allocated = calibration.choose(mean_top_k=mean)
        uniform = PatchConfig("block_topk", {**by_recall.config.params, "top_k": round(mean)})
        row = {"target": recall, "mean_budget": mean, "min_budget": min(min(b) for b in by_recall.budgets.values()),
               "max_budget": max(max(b) for b in by_recall.budgets.values()), "uniform_top_k": round(mean),
               "allocated_mean": allocated.mean_budget(), "table": by_recall.table(),
               "budgets": {str(k): v for k, v in by_recall.budgets.items()},
               "allocated_budgets": {str(k): v for k, v in allocated.budgets.items()}}
        for name, config in (("by_recall", by_recall.config), ("allocated", allocated.config), ("uniform", uniform)):
            (out / f"config-{name}-{recall}.json").write_text(config.to_json())
            row[name] = measured_ppl(model, test_ids, args, config)
        rows.append(row)
        print({k: row[k] for k in ("target", "mean_budget", "by_recall", "allocated", "uniform")}, flush=True)
        (out / "calibration.json").write_text(json.dumps({"environment": environment(0), "settings": vars(args),
                                                          "source": test_source, "dense": dense, "rows": rows},
                                                         indent=1))
    write_report(out, args, dense, rows)

if __name__ == "__main__":
    main()
