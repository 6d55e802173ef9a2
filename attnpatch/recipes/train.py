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
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..api import patch_model, save_patched
from ..config import PatchConfig
from ..errors import PatchError
from ..runtime.dispatch import attention_transfer
from .config import RecipeConfig, StageConfig
from .data import packed_blocks

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _is_attnpatch(name: str) -> bool:
    return ".attnpatch_" in name or name.startswith("attnpatch_")


def _trainable(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _loss(model, batch: torch.Tensor, stage: str, attention_ce: float = 0.0) -> torch.Tensor:
    if stage == "stage1":
        with attention_transfer(attention_ce) as losses:
            model(input_ids=batch, use_cache=False)
        if not losses:
            raise RuntimeError("stage 1 found no trainable patched attention: does the method train parameters?")
        return torch.stack(losses).mean()
    return model(input_ids=batch, labels=batch, use_cache=False).loss


@torch.no_grad()
def _evaluate(model, blocks: torch.Tensor, stage: str, batch_size: int, device, attention_ce: float = 0.0) -> float:
    if blocks.numel() == 0:
        return float("nan")
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, len(blocks), batch_size):
        batch = blocks[i : i + batch_size].to(device)
        total += float(_loss(model, batch, stage, attention_ce)) * len(batch)
    model.train(was_training)
    return total / len(blocks)


def _save_checkpoint(directory: Path, step: int, model, optimizer, history: list) -> None:
    tmp = directory.with_name(directory.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    torch.save({"step": step, "trainable": {k: v.detach().cpu() for k, v in _trainable(model).items()},
                "optimizer": optimizer.state_dict(), "history": history, "rng": torch.get_rng_state()},
               tmp / "checkpoint.pt")
    if directory.exists():
        shutil.rmtree(directory)
    tmp.rename(directory)


def _load_checkpoint(directory: Path, model, optimizer) -> tuple[int, list]:
    state = torch.load(directory / "checkpoint.pt", weights_only=False)
    params = _trainable(model)
    missing = sorted(set(params) - set(state["trainable"]))
    if missing:
        raise RuntimeError(f"checkpoint {directory} does not match the model: missing {missing[:3]}")
    with torch.no_grad():
        for name, value in state["trainable"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    return state["step"], state["history"]


def run_stage(name: str, model, stage: StageConfig, train: torch.Tensor, evaluation: torch.Tensor, accelerator,
              out: Path, seed: int) -> dict:
    """Train what requires grad for `stage.steps` optimizer steps; returns the stage's record."""
    from torch.utils.data import DataLoader, TensorDataset

    params = list(_trainable(model).values())
    optimizer = torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(TensorDataset(train), batch_size=stage.batch_size, shuffle=True, generator=generator)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    checkpoint = out / name / "checkpoint"
    step, history = 0, []
    if checkpoint.exists():
        step, history = _load_checkpoint(checkpoint, accelerator.unwrap_model(model), optimizer)
        accelerator.print(f"{name}: resumed at step {step} from {checkpoint}")
    device = accelerator.device
    model.train()
    t0 = time.perf_counter()
    tokens = 0
    bar = tqdm(total=stage.steps, initial=step, desc=name, disable=not accelerator.is_main_process)
    seq_len = train.shape[1]

    def evaluate(record):
        record["eval_loss"] = _evaluate(model, evaluation, name, stage.batch_size, device, stage.attention_ce)
        if name == "stage1":  # also the model's own next-token loss, to follow perplexity
            record["eval_lm_loss"] = _evaluate(model, evaluation, "stage2", stage.batch_size, device)
        else:
            record["eval_lm_loss"] = record["eval_loss"]
        record["train_tokens"] = step * stage.batch_size * seq_len * accelerator.num_processes
        return record

    if step == 0:
        history.append(evaluate({"step": 0}))
    while step < stage.steps:
        for (batch,) in loader:
            with accelerator.accumulate(model):
                loss = _loss(model, batch, name, stage.attention_ce) / stage.grad_accum
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            tokens += batch.numel() * accelerator.num_processes
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss) * stage.grad_accum:.4g}")
            record = {"step": step, "train_loss": float(loss) * stage.grad_accum}
            if step % stage.eval_every == 0 or step == stage.steps:
                evaluate(record)
                accelerator.print(f"{name} step {step}: eval loss {record['eval_loss']:.4g}, "
                                  f"eval perplexity {math.exp(min(record['eval_lm_loss'], 50)):.2f}")
            history.append(record)
            if accelerator.is_main_process and (step % stage.checkpoint_every == 0 or step == stage.steps):
                _save_checkpoint(checkpoint, step, accelerator.unwrap_model(model), optimizer, history)
            if step >= stage.steps:
                break
    bar.close()
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    return {"steps": step, "tokens_this_run": tokens, "seconds_this_run": time.perf_counter() - t0,
            "eval_loss_first": evals[0] if evals else None, "eval_loss_last": evals[-1] if evals else None,
            "history": history}


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


def convert(config: RecipeConfig) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from ..models import load_model

    accelerator = Accelerator(gradient_accumulation_steps=max(config.stage1.grad_accum, config.stage2.grad_accum))
    set_seed(config.seed)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(config.model, DTYPES[config.dtype])
    data = config.data
    train = packed_blocks(tokenizer, data.train, data, data.train_tokens, data.hub_train_split)
    evaluation = packed_blocks(tokenizer, data.eval, data, data.eval_tokens, data.hub_eval_split)
    summary = {"recipe": config.to_dict(), "train_blocks": len(train), "eval_blocks": len(evaluation), "stages": {}}
    batch = max(config.stage1.batch_size, 1)
    dense_loss = _evaluate(model, evaluation, "stage2", batch, accelerator.device)
    summary["dense_eval_perplexity"] = math.exp(min(dense_loss, 50.0))
    if config.prune.ratio:
        summary["pruning"] = _prune(model, config.prune, train)
        accelerator.print(f"pruned {summary['pruning']['heads_removed']} heads: "
                          f"{summary['pruning']['params_before'] / 1e6:.2f}M -> "
                          f"{summary['pruning']['params_after'] / 1e6:.2f}M parameters")
    if config.attention is not None:
        patch_model(model, PatchConfig.from_dict(config.attention))
    summary["untrained_eval_perplexity"] = math.exp(min(_evaluate(model, evaluation, "stage2", batch,
                                                                  accelerator.device), 50.0))
    accelerator.print(f"eval perplexity: dense {summary['dense_eval_perplexity']:.2f}, "
                      f"patched before training {summary['untrained_eval_perplexity']:.2f}")

    if config.stage1.steps:
        for name, p in model.named_parameters():
            p.requires_grad_(_is_attnpatch(name))
        summary["stages"]["stage1"] = run_stage("stage1", model, config.stage1, train, evaluation, accelerator, out,
                                                config.seed)
        model = accelerator.unwrap_model(model)
    if config.stage2.steps:
        for p in model.parameters():
            p.requires_grad_(False)
        use_lora = config.stage2.lora_r > 0
        if use_lora:
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(r=config.stage2.lora_r, lora_alpha=config.stage2.lora_alpha,
                              target_modules=config.stage2.lora_targets, lora_dropout=0.0, bias="none")
            model = get_peft_model(model, lora)
        if config.stage2.train_attnpatch:  # e.g. gated attention's gates, with or without LoRA
            for name, p in model.named_parameters():
                if _is_attnpatch(name):
                    p.requires_grad_(True)
        if not _trainable(model):
            raise PatchError("stage2 has nothing to train: set lora_r > 0, or train_attnpatch: true for a method "
                             "with parameters (list_methods() says which train)")
        summary["stages"]["stage2"] = run_stage("stage2", model, config.stage2, train, evaluation, accelerator, out,
                                                config.seed + 1)
        model = accelerator.unwrap_model(model)
        if use_lora and config.merge_lora:
            model = model.merge_and_unload()
        elif use_lora:
            model.save_pretrained(out / "lora_adapter")
            model = model.base_model.model
    accelerator.wait_for_everyone()
    final = out / "final"
    if accelerator.is_main_process:
        model.eval()
        save_patched(model, final)
        tokenizer.save_pretrained(final)
        # a probe for "the artifact reloads to identical outputs"
        probe = (evaluation if len(evaluation) else train)[:1, : min(64, data.seq_len)]
        with torch.no_grad():
            torch.save({"input_ids": probe, "logits": model(input_ids=probe, use_cache=False).logits},
                       out / "probe.pt")
        for stage in summary["stages"].values():
            lm = [h["eval_lm_loss"] for h in stage["history"] if "eval_lm_loss" in h]
            if lm:
                stage["eval_perplexity_after"] = math.exp(min(lm[-1], 50.0))
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        plot_progress(summary, out / "perplexity_vs_tokens.png")
        accelerator.print(f"wrote {final} (open it with attnpatch.load_patched) and {out / 'summary.json'}")
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
    args = ap.parse_args(argv)
    convert(RecipeConfig.load(args.recipe, args.set))


if __name__ == "__main__":
    main()
