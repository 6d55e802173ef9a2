"""Convert a model to a patched attention with the two-stage recipe, under `accelerate launch`:

    accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/convert.py recipes/<name>.yaml

stage 1, attention transfer: the base model frozen, only attnpatch's parameters (feature maps,
gates) trained so each patched layer's output matches its softmax output (see distill.py);
stage 2, LoRA recovery: peft LoRA on the attention projections, next-token loss, attnpatch's
parameters frozen. Progress bars, periodic eval loss, a resumable checkpoint of what trains, and
a final artifact that `attnpatch.load_patched` opens (LoRA merged by default).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from ..analysis.activation_calibration import calibrate_from_activations, calibrated_methods
from ..api import patch_model, save_patched
from ..config import PatchConfig
from ..errors import PatchError
from .config import RecipeConfig
from .data import packed_blocks
from .model_setup import DTYPES, checkpointing, is_attnpatch, train_only, with_lora
from .stages import evaluate_loss, run_stage, state_digest


def _patch(model, config: RecipeConfig, train: torch.Tensor, summary: dict) -> None:
    """The recipe's attention patch; methods that start from activations (mla, kv_merge's pca) are
    calibrated on the first `calibration_blocks` training blocks."""
    patch_model(model, PatchConfig.from_dict(config.attention))
    if calibrated_methods(model) and config.calibration_blocks:
        blocks = train[: config.calibration_blocks]
        summary["activation_calibration"] = calibrate_from_activations(
            model, blocks.split(max(config.stage1.batch_size, 1)))


def _prune(model, prune, train: torch.Tensor) -> dict:
    """Score heads on the first training blocks and remove the lowest (recipe `prune` section)."""
    from ..analysis.head_importance import greedy_head_pruning, head_importance

    batches = [block[None] for block in train[: prune.calibration_blocks]]
    options = {"score": prune.score, "scope": prune.scope, "unit": prune.unit}
    if prune.greedy_steps > 1:
        if prune.balanced:
            raise PatchError("prune.balanced works with one scoring round (greedy_steps: 1)")
        plan, _ = greedy_head_pruning(model, batches, prune.ratio, steps=prune.greedy_steps, **options)
    else:
        scores = ("gradient",) if prune.score == "random" else (prune.score,)
        importance = head_importance(model, batches, scores=scores)
        plan = importance.plan(prune.ratio, balanced=prune.balanced, **options)
    before = sum(p.numel() for p in model.parameters())
    patch_model(model, plan)
    return {"config": plan.to_dict(), "params_before": before, "params_after": sum(p.numel() for p in model.parameters()),
            "heads_removed": sum(len(p["heads"]) for p in plan.layer_params.values())}


def _has_accelerator() -> bool:
    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def convert(config: RecipeConfig) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from ..models import load_model
    from ..runtime.modes import exact_attention_everywhere
    from .sharding import full_state_dict, shard_model, sharding_settings

    fsdp = sharding_settings(config.fsdp)
    sharded = fsdp is not None
    if sharded and config.prune.ratio:
        raise PatchError("fsdp: pruning gives layers different shapes; run pruning recipes without fsdp")
    # without a GPU (or other accelerator) accelerate only joins the launched processes when told to
    # run on CPU; then they form one process group over gloo
    accelerator = Accelerator(cpu=not _has_accelerator(),
                              gradient_accumulation_steps=max(config.stage1.grad_accum, config.stage2.grad_accum))
    set_seed(config.seed)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with accelerator.main_process_first():  # one process fills the model / dataset caches, the others read them
        model, tokenizer = load_model(config.model, DTYPES[config.dtype])
        data = config.data
        train = packed_blocks(tokenizer, data.train, data, data.train_tokens, data.hub_train_split)
        evaluation = packed_blocks(tokenizer, data.eval, data, data.eval_tokens, data.hub_eval_split)
    summary = {"recipe": config.to_dict(), "processes": accelerator.num_processes,
               "distributed_type": "FSDP" if sharded else str(accelerator.distributed_type).split(".")[-1],
               "train_blocks": len(train), "eval_blocks": len(evaluation), "stages": {}}
    accelerator.print(f"{accelerator.num_processes} process(es), {summary['distributed_type']}, "
                      f"device {accelerator.device}")
    batch = max(config.stage1.batch_size, 1)
    use_lora = config.stage2.steps > 0 and config.stage2.lora_r > 0
    if sharded:
        # everything that trains exists before sharding: the patch, then LoRA (B = 0: no change yet)
        if config.attention is not None:
            _patch(model, config, train, summary)
        if use_lora:
            model = with_lora(model, config.stage2, config.seed)
        for p in model.parameters():
            p.requires_grad_(False)
        replicated = [p for name, p in model.named_parameters() if is_attnpatch(name)]
        blocks = shard_model(model, accelerator.device, accelerator.num_processes, replicated,
                             cpu_offload=fsdp.cpu_offload, reshard_after_forward=fsdp.reshard_after_forward)
        summary["fsdp"] = {"blocks": blocks, "cpu_offload": fsdp.cpu_offload,
                           "reshard_after_forward": fsdp.reshard_after_forward}
        accelerator.print(f"fsdp: {blocks} blocks sharded over {accelerator.num_processes} processes")
        with exact_attention_everywhere():  # the base model's attention: the dense reference
            dense_loss = evaluate_loss(model, evaluation, "stage2", batch, accelerator)
    else:
        model.to(accelerator.device)
        dense_loss = evaluate_loss(model, evaluation, "stage2", batch, accelerator)
    summary["dense_eval_perplexity"] = math.exp(min(dense_loss, 50.0))
    if config.prune.ratio:
        summary["pruning"] = _prune(model, config.prune, train)
        accelerator.print(f"pruned {summary['pruning']['heads_removed']} heads: "
                          f"{summary['pruning']['params_before'] / 1e6:.2f}M -> "
                          f"{summary['pruning']['params_after'] / 1e6:.2f}M parameters")
    if config.attention is not None and not sharded:
        _patch(model, config, train, summary)
    summary["untrained_eval_perplexity"] = math.exp(min(evaluate_loss(model, evaluation, "stage2", batch,
                                                                  accelerator), 50.0))
    accelerator.print(f"eval perplexity: dense {summary['dense_eval_perplexity']:.2f}, "
                      f"patched before training {summary['untrained_eval_perplexity']:.2f}")

    if config.stage1.steps:
        train_only(model, "stage1", config.stage2)
        recomputes = checkpointing(model, config.stage1.gradient_checkpointing)
        summary["stages"]["stage1"] = run_stage("stage1", model, config.stage1, train, evaluation, accelerator, out,
                                                config.seed)
        summary["stages"]["stage1"]["gradient_checkpointing"] = recomputes
        model = model if sharded else accelerator.unwrap_model(model)
    if config.stage2.steps:
        if use_lora and not sharded:
            model = with_lora(model, config.stage2, config.seed)
        train_only(model, "stage2", config.stage2)
        recomputes = checkpointing(model, config.stage2.gradient_checkpointing)
        summary["stages"]["stage2"] = run_stage("stage2", model, config.stage2, train, evaluation, accelerator, out,
                                                config.seed + 1)
        summary["stages"]["stage2"]["gradient_checkpointing"] = recomputes
        model = model if sharded else accelerator.unwrap_model(model)
    if sharded:  # final/ from the full state dict, on the main process, in an unsharded copy of the model
        full = full_state_dict(model)
        model = None
        if accelerator.is_main_process:
            model, _ = load_model(config.model, DTYPES[config.dtype])
            if config.attention is not None:
                patch_model(model, PatchConfig.from_dict(config.attention))
            if use_lora:
                model = with_lora(model, config.stage2, config.seed)
            model.load_state_dict(full)
    if use_lora and model is not None:
        if config.merge_lora:
            model = model.merge_and_unload()
        else:
            if accelerator.is_main_process:
                model.save_pretrained(out / "lora_adapter")
            model = model.base_model.model
    accelerator.wait_for_everyone()
    final = out / "final"
    if accelerator.is_main_process:
        model.eval()
        for stage in summary["stages"].values():
            lm = [h["eval_lm_loss"] for h in stage["history"] if "eval_lm_loss" in h]
            if lm:
                stage["eval_perplexity_after"] = math.exp(min(lm[-1], 50.0))
        save_patched(model, final, training=summary)  # the model card names the base model from its config
        tokenizer.save_pretrained(final)
        summary["final_state_digest"] = state_digest(model)  # what this process held when it saved final/
        # a probe for "the artifact reloads to identical outputs"
        probe = (evaluation if len(evaluation) else train)[:1, : min(64, data.seq_len)]
        with torch.no_grad():  # run where the model is (a GPU), kept on the CPU for any reader
            logits = model(input_ids=probe.to(next(model.parameters()).device), use_cache=False).logits
            torch.save({"input_ids": probe.cpu(), "logits": logits.cpu()}, out / "probe.pt")
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        plot_progress(summary, out / "perplexity_vs_tokens.png")
        accelerator.print(f"wrote {final} (open it with attnpatch.load_patched) and {out / 'summary.json'}")
    accelerator.wait_for_everyone()
    return final


def plot_progress(summary: dict, path: Path) -> Path | None:
    """Eval perplexity against training tokens, stage 1 then stage 2, with the dense level."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    offset = 0
    for name, stage in summary["stages"].items():
        points = [(offset + h["train_tokens"], math.exp(min(h["eval_lm_loss"], 50.0)))
                  for h in stage["history"] if "eval_lm_loss" in h]
        if points:
            ax.plot(*zip(*points), marker="o", label=name)
            offset = points[-1][0]
    ax.axhline(summary["dense_eval_perplexity"], color="gray", linestyle="--", label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("eval perplexity")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe", help="recipe YAML")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a recipe field, e.g. --set stage1.steps=10 --set output_dir=out/x")
    ap.add_argument("--dry-run", action="store_true",
                    help="build the model from its config on the meta device, patch it, count what trains and "
                         "estimate the memory per process; no weights are loaded and nothing trains")
    ap.add_argument("--processes", type=int, default=None,
                    help="processes to estimate for with --dry-run (default: the launch's, else 1)")
    args = ap.parse_args(argv)
    config = RecipeConfig.load(args.recipe, args.set)
    if args.dry_run:
        import os

        from .dry_run import dry_run, format_report

        processes = args.processes or int(os.environ.get("WORLD_SIZE", "1"))
        if processes < 1:
            raise PatchError(f"--processes must be >= 1, got {processes}")
        report = dry_run(config, processes)
        print(format_report(report))
        out = Path(config.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "dry_run.json").write_text(json.dumps(report, indent=2) + "\n")
        return
    convert(config)


if __name__ == "__main__":
    main()
