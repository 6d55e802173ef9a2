"""LoRA recovery of pruned SmolLM2 runs (recipes/smollm2_prune_recover.yaml with overrides) side by
side with the dense + LoRA control, from the runs' summary.json files:

    python eval/benchmarks/heads_recovery_table.py eval/results/heads-smollm2/recovery/*summary*.json \
        --control eval/results/lolcats-smollm2/control_dense_lora_summary.json \
        --out eval/results/heads-smollm2/recovery/recovery.md
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def perplexity_by_step(summary: dict) -> dict[int, float]:
    history = summary["stages"].get("stage2", {}).get("history", [])
    return {h["step"]: math.exp(min(h["eval_lm_loss"], 50.0)) for h in history if "eval_lm_loss" in h}


def describe(summary: dict) -> str:
    prune = summary["recipe"]["prune"]
    unit = "kv groups" if prune["unit"] == "group" else "query heads"
    return f"{prune['ratio']:.2f} of {unit} by {prune['score']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("summaries", nargs="+")
    parser.add_argument("--control", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    control = json.loads(Path(args.control).read_text())
    runs = [json.loads(Path(p).read_text()) for p in args.summaries]
    steps = sorted(set.intersection(*(set(perplexity_by_step(r)) for r in runs + [control])))
    lines = [f"Eval perplexity (WikiText-2 test, {control['recipe']['data']['eval_tokens']} tokens in "
             f"{control['recipe']['data']['seq_len']}-token blocks); untuned dense "
             f"{control['dense_eval_perplexity']:.2f}.", "",
             "| run | heads removed | parameters (M) | " + " | ".join(f"step {s}" for s in steps) + " |",
             "|---|---|---|" + "---|" * len(steps)]
    control_ppl = perplexity_by_step(control)
    lines.append("| dense + LoRA (control) | 0 | 134.52 | " + " | ".join(f"{control_ppl[s]:.2f}" for s in steps) + " |")
    for run in runs:
        ppl = perplexity_by_step(run)
        pruning = run["pruning"]
        cells = [f"{ppl[s]:.2f} ({ppl[s] / control_ppl[s]:.2f}x)" for s in steps]
        lines.append(f"| {describe(run)} | {pruning['heads_removed']} | {pruning['params_after'] / 1e6:.2f} | "
                     + " | ".join(cells) + " |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(runs, control, Path(args.out).with_suffix(".png"))


def plot(runs: list[dict], control: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    curve = perplexity_by_step(control)
    ax.plot(list(curve), list(curve.values()), "k--", marker="o", label="dense + LoRA (control)")
    for run in runs:
        curve = perplexity_by_step(run)
        ax.plot(list(curve), list(curve.values()), marker="o", label=describe(run))
    ax.set_yscale("log")
    ax.set_xlabel("LoRA steps (1024 tokens each)")
    ax.set_ylabel("eval perplexity")
    ax.set_title("SmolLM2-135M: pruned heads, LoRA recovery")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
