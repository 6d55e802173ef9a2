"""The recipe dry run against measurement, and the large recipes' memory per GPU.

    python eval/benchmarks/dry_run_check.py --out eval/results/recipes-dry-run

1. SmolLM2-135M LoLCATs recipe (recipes/smollm2_lolcats.yaml): `--dry-run`'s estimate of gradients +
   AdamW state + activations against the peak memory growth of a real training step of each stage
   (the second step, when AdamW's state exists), same batch and sequence length, on this CPU.
2. The Llama 3 8B (8 GPUs, data parallel) and 70B (8 GPUs, fsdp) LoLCATs recipes, from the
   architectures in recipes/configs/ (no weights are read).
Writes dry_run_check.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from attnpatch import patch_model
from attnpatch.config import PatchConfig
from attnpatch.evaluation.memory import peak_memory
from attnpatch.models import load_model
from attnpatch.recipes.config import RecipeConfig
from attnpatch.recipes.dry_run import dry_run
from attnpatch.recipes.model_setup import checkpointing, train_only, trainable, with_lora
from attnpatch.recipes.stages import stage_loss

ROOT = Path(__file__).resolve().parents[2]


def measured_step_peaks(config: RecipeConfig) -> dict:
    model, _ = load_model(config.model)
    patch_model(model, PatchConfig.from_dict(config.attention))
    model = with_lora(model, config.stage2, config.seed)
    peaks = {}
    for label, stage, settings, recompute in (("stage1", "stage1", config.stage1, False),
                                              ("stage2", "stage2", config.stage2, False),
                                              ("stage2, gradient checkpointing", "stage2", config.stage2, True)):
        batch = torch.randint(10, 40000, (settings.batch_size, config.data.seq_len),
                              generator=torch.Generator().manual_seed(0))
        train_only(model, stage, config.stage2)
        checkpointing(model, recompute)
        model.train()
        optimizer = torch.optim.AdamW(list(trainable(model).values()), lr=1e-4)
        for _ in range(2):
            with peak_memory() as mem:
                stage_loss(model, batch, stage).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        peaks[label] = mem["bytes"] / 1e9
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("eval/results/recipes-dry-run"))
    args = parser.parse_args()
    small = RecipeConfig.load(ROOT / "recipes/smollm2_lolcats.yaml")
    recomputing = RecipeConfig.load(ROOT / "recipes/smollm2_lolcats.yaml", ["stage2.gradient_checkpointing=true"])
    estimates = {"stage1": dry_run(small, 1)["stages"]["stage1"], "stage2": dry_run(small, 1)["stages"]["stage2"],
                 "stage2, gradient checkpointing": dry_run(recomputing, 1)["stages"]["stage2"]}
    peaks = measured_step_peaks(small)
    rows = []
    for stage, peak in peaks.items():
        s = estimates[stage]
        predicted = s["grads_and_adam_gb"] + s["activations_gb"]
        rows.append({"stage": stage, "estimated_gb": predicted, "measured_gb": peak, "ratio": predicted / peak})
    large = {}
    for recipe, arch in (("llama3_8b_lolcats.yaml", "llama3-8b"), ("llama3_70b_lolcats.yaml", "llama3-70b")):
        config = RecipeConfig.load(ROOT / "recipes" / recipe, [f"model={ROOT / 'recipes/configs' / arch}"])
        large[recipe] = dry_run(config, 8)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dry_run_check.json").write_text(json.dumps(
        {"command": " ".join(["python", *sys.argv]), "smollm2_step": rows, "large": large}, indent=1))
    lines = ["SmolLM2-135M LoLCATs recipe, one training step (fp32, batch 2 x 512 tokens): gradients + AdamW + "
             "activations, dry-run estimate vs measured peak memory growth", "",
             "| stage | estimated GB | measured GB | estimate / measured |", "|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['estimated_gb']:.2f} | {r['measured_gb']:.2f} | {r['ratio']:.2f} |" for r in rows]
    lines += ["", "Per GPU (8 processes), from the architecture alone:", "",
              "| recipe | params | fsdp | stage | trains | weights GB | grads+AdamW GB | activations GB | total GB |",
              "|---|---|---|---|---|---|---|---|---|"]
    for recipe, report in large.items():
        for stage, s in report["stages"].items():
            lines.append(f"| {recipe} | {report['total_params'] / 1e9:.2f} B | {'on' if report['fsdp'] else 'off'} | "
                         f"{stage} | {s['trainable_params'] / 1e6:.1f} M | {s['weights_gb']:.1f} | "
                         f"{s['grads_and_adam_gb']:.2f} | {s['activations_gb']:.1f} | {s['total_gb']:.1f} |")
    (args.out / "dry_run_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
