"""Converted model vs the dense+LoRA control, step by step, from the two recipes' summary.json.

    python eval/benchmarks/compare_conversion.py eval/results/lolcats-smollm2/summary.json \
        eval/results/lolcats-smollm2/control_dense_lora_summary.json --out eval/results/lolcats-smollm2

Writes conversion_vs_control.md (eval perplexity at every evaluated LoRA step of both runs, and
the gap) and conversion_vs_control.png (perplexity vs training tokens: stage 1, stage 2, control).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def perplexities(summary: dict, stage: str) -> dict[int, float]:
    history = summary["stages"].get(stage, {}).get("history", [])
    return {h["step"]: math.exp(min(h["eval_lm_loss"], 50.0)) for h in history if "eval_lm_loss" in h}


def table(converted: dict, control: dict) -> str:
    ours, theirs = perplexities(converted, "stage2"), perplexities(control, "stage2")
    lines = [f"dense (untuned) eval perplexity: {converted['dense_eval_perplexity']:.2f}", "",
             "| LoRA steps | converted | dense + LoRA (control) | converted / control |", "|---|---|---|---|"]
    for step in sorted(set(ours) & set(theirs)):
        lines.append(f"| {step} | {ours[step]:.2f} | {theirs[step]:.2f} | {ours[step] / theirs[step]:.3f} |")
    return "\n".join(lines)


def plot(converted: dict, control: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens_per_step = {s: converted["recipe"][s]["batch_size"] * converted["recipe"][s]["grad_accum"]
                       * converted["recipe"]["data"]["seq_len"] for s in ("stage1", "stage2")}
    stage1 = perplexities(converted, "stage1")
    offset = max(stage1, default=0) * tokens_per_step["stage1"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot([s * tokens_per_step["stage1"] for s in stage1], list(stage1.values()), "o-", label="stage 1 (transfer)")
    stage2 = perplexities(converted, "stage2")
    ax.plot([offset + s * tokens_per_step["stage2"] for s in stage2], list(stage2.values()), "s-",
            label="stage 2 (LoRA)")
    ctrl = perplexities(control, "stage2")
    ax.plot([offset + s * tokens_per_step["stage2"] for s in ctrl], list(ctrl.values()), "^--",
            label="control: dense + LoRA (same steps)")
    ax.axhline(converted["dense_eval_perplexity"], color="gray", ls=":", label="dense, untuned")
    ax.set(yscale="log", xlabel="training tokens", ylabel="eval perplexity",
           title="conversion vs dense+LoRA control")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("converted", help="summary.json of the conversion")
    parser.add_argument("control", help="summary.json of the dense+LoRA control")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    converted = json.loads(Path(args.converted).read_text())
    control = json.loads(Path(args.control).read_text())
    out = Path(args.out)
    text = table(converted, control)
    (out / "conversion_vs_control.md").write_text(f"# Conversion vs dense+LoRA control\n\n{text}\n")
    plot(converted, control, out / "conversion_vs_control.png")
    print(text)


if __name__ == "__main__":
    main()
