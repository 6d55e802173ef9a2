"""Gated attention on SmolLM2-135M after gate-only training (recipes/smollm2_gated.yaml): perplexity
and attention sinks of the dense model and of the trained gates, plus how far the gates moved.

    accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/convert.py recipes/smollm2_gated.yaml
    python eval/benchmarks/gated_smollm2.py        # ~2 min on 2 CPU cores
Writes eval/results/gated-smollm2/{results.json, report.md, sinks_dense.png, sinks_gated.png}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from attnpatch import load_patched
from attnpatch.analysis.sink_inspector import inspect_sinks
from attnpatch.evaluation.data import load_text
from attnpatch.evaluation.perplexity import windowed_perplexity
from attnpatch.models import load_default_model


def measure(model, ids, valid_ids, out: Path, label: str) -> dict:
    ppl = windowed_perplexity(model, ids, 512, max_tokens=8192, desc=f"{label} ppl").perplexity
    batches = [valid_ids[i * 512:(i + 1) * 512][None] for i in range(4)]
    report = inspect_sinks(model, batches)
    tower = report.towers[0]
    report.plot(out / f"sinks_{label}.png", tower=tower)
    first = report.first_token[tower]
    return {"perplexity": ppl, "first_token_mass": float(first.nanmean()),
            "first_token_mass_layers_12_plus": float(first[12:].nanmean()), "heads_over_half": int((first > 0.5).sum()),
            "max_activation": max(row["values"][0] for row in report.massive[tower])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="out/smollm2-gated/final")
    parser.add_argument("--out", default="eval/results/gated-smollm2")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dense, tokenizer = load_default_model()
    ids = tokenizer(load_text(split="test")[0], return_tensors="pt").input_ids[0]
    valid_ids = tokenizer(load_text(split="valid")[0], return_tensors="pt").input_ids[0]
    results = {"dense": measure(dense.eval(), ids, valid_ids, out, "dense")}
    gated = load_patched(args.checkpoint).eval()
    results["gated"] = measure(gated, ids, valid_ids, out, "gated")
    gates = []  # mean gate per head over 512 valid tokens: 2 sigmoid(x W + b), 1 = untouched
    hooks = [layer.self_attn.attnpatch_gate.register_forward_hook(
        lambda module, args, output: gates.append((2 * torch.sigmoid(output)).mean(dim=(0, 1))))
        for layer in gated.model.layers]
    with torch.no_grad():
        gated(input_ids=valid_ids[:512][None])
    for hook in hooks:
        hook.remove()
    gates = torch.stack(gates)
    results["gates"] = {"mean": float(gates.mean()), "min": float(gates.min()), "max": float(gates.max()),
                        "heads_below_0.5": int((gates < 0.5).sum()), "heads": gates.numel()}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    rows = ["| model | perplexity (8k test tokens, 512 windows) | first-token mass | layers 12+ | heads > 0.5 | "
            "max activation |", "|---|---|---|---|---|---|"]
    for name in ("dense", "gated"):
        r = results[name]
        rows.append(f"| {name} | {r['perplexity']:.2f} | {r['first_token_mass']:.3f} | "
                    f"{r['first_token_mass_layers_12_plus']:.3f} | {r['heads_over_half']} | {r['max_activation']:.0f} |")
    g = results["gates"]
    (out / "report.md").write_text("# Gated attention on SmolLM2-135M (gate-only training)\n\n" + "\n".join(rows) +
                                   f"\n\nGates (mean per head over 512 WikiText-2 valid tokens): mean {g['mean']:.3f}, "
                                   f"min {g['min']:.3f}, max {g['max']:.3f}; {g['heads_below_0.5']} of {g['heads']} "
                                   "heads below 0.5.\n")
    print((out / "report.md").read_text())


if __name__ == "__main__":
    main()
