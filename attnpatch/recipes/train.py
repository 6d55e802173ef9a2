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
import hashlib
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
def _evaluate(model, blocks: torch.Tensor, stage: str, batch_size: int, accelerator, attention_ce: float = 0.0) -> float:
    """Mean loss over the blocks; with several processes each scores its share and the sums are added."""
    if blocks.numel() == 0:
        return float("nan")
    was_training = model.training
    model.eval()
    # block rank + k·processes; every process runs as many batches (a sharded forward is a collective),
    # the positions past the end repeat block 0 with weight 0
    share = -(-len(blocks) // accelerator.num_processes)
    index = accelerator.process_index + accelerator.num_processes * torch.arange(share)
    weight = (index < len(blocks)).double()
    index = torch.where(index < len(blocks), index, 0)
    total = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    for i in range(0, share, batch_size):
        batch, w = blocks[index[i : i + batch_size]].to(accelerator.device), weight[i : i + batch_size]
        if bool(w.all()):
            total += float(_loss(model, batch, stage, attention_ce)) * len(batch)
            continue
        for j in range(len(batch)):  # the last batch holds padding: block by block, padding weighs nothing
            total += float(_loss(model, batch[j : j + 1], stage, attention_ce)) * float(w[j])
    model.train(was_training)
    return float(accelerator.reduce(total, "sum")) / len(blocks)


def epoch_order(blocks: int, epoch: int, seed: int) -> torch.Tensor:
    """The order in which an epoch visits the training blocks: fixed by (seed, epoch) alone, so every
    process agrees on it, a resumed run continues it, and the number of processes does not change it."""
    return torch.randperm(blocks, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def rank_batches(blocks: int, batch_size: int, processes: int, rank: int, epoch: int, seed: int) -> list[torch.Tensor]:
    """This process's batches for one epoch: global batch i is blocks order[i·B·P : (i+1)·B·P] (B the
    per-process batch, P processes) and process r takes its r-th slice of B. One process with batch
    B·P therefore sees exactly the global batches of P processes with batch B; the last incomplete
    global batch is dropped, so every process takes the same number of steps."""
    order = epoch_order(blocks, epoch, seed)
    per_step = batch_size * processes
    return [order[i + rank * batch_size : i + (rank + 1) * batch_size]
            for i in range(0, blocks - per_step + 1, per_step)]


def trainable_digest(model) -> str:
    """sha256 of the trainable parameters' bytes (names sorted): equal digests mean equal parameters."""
    from .sharding import full_tensor

    digest = hashlib.sha256()
    for name, p in sorted(_trainable(model).items()):
        digest.update(name.encode())
        digest.update(full_tensor(p.detach()).float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def state_digest(model) -> str:
    """sha256 of every tensor of the state dict (names sorted), for "final/ holds what was trained"."""
    digest = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


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


def learning_rate(stage: StageConfig, step: int) -> float:
    """The rate for optimizer step `step` (0-based): linear warm-up over warmup_steps, then constant or a
    cosine decay to 0 at stage.steps. A function of the step alone, so a resumed run continues it."""
    if step < stage.warmup_steps:
        return stage.lr * (step + 1) / stage.warmup_steps
    if stage.lr_schedule == "constant":
        return stage.lr
    progress = (step - stage.warmup_steps) / max(1, stage.steps - stage.warmup_steps)
    return stage.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def run_stage(name: str, model, stage: StageConfig, train: torch.Tensor, evaluation: torch.Tensor, accelerator,
              out: Path, seed: int) -> dict:
    """Train what requires grad for `stage.steps` steps (one batch per process each, gradients
    averaged across processes); returns the stage's record."""
    from .sharding import average_replicated_gradients, is_sharded, load_sharded_checkpoint, save_sharded_checkpoint

    params = list(_trainable(model).values())
    optimizer = torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay)
    sharded = is_sharded(model)  # FSDP: the model is its own wrapper; gradients are reduce-scattered in backward
    if not sharded:
        model, optimizer = accelerator.prepare(model, optimizer)
    processes, rank = accelerator.num_processes, accelerator.process_index
    steps_per_epoch = len(train) // (stage.batch_size * processes)
    if steps_per_epoch == 0:
        raise PatchError(f"{name}: {len(train)} training blocks are fewer than batch_size x processes "
                         f"({stage.batch_size} x {processes}); add data (data.train_tokens) or lower the batch size")
    checkpoint = out / name / "checkpoint"
    step, history = 0, []
    if checkpoint.exists():
        if sharded:
            step, history = load_sharded_checkpoint(checkpoint, model, optimizer)
        else:
            step, history = _load_checkpoint(checkpoint, accelerator.unwrap_model(model), optimizer)
        accelerator.print(f"{name}: resumed at step {step} from {checkpoint}")
    device = accelerator.device
    model.train()
    t0 = time.perf_counter()
    tokens = 0
    bar = tqdm(total=stage.steps, initial=step, desc=name, disable=not accelerator.is_main_process)
    seq_len = train.shape[1]

    def evaluate(record):
        record["eval_loss"] = _evaluate(model, evaluation, name, stage.batch_size, accelerator, stage.attention_ce)
        if name == "stage1":  # also the model's own next-token loss, to follow perplexity
            record["eval_lm_loss"] = _evaluate(model, evaluation, "stage2", stage.batch_size, accelerator)
        else:
            record["eval_lm_loss"] = record["eval_loss"]
        record["train_tokens"] = step * stage.batch_size * seq_len * processes
        return record

    if step == 0:
        history.append(evaluate({"step": 0}))
    while step < stage.steps:
        epoch, offset = divmod(step, steps_per_epoch)  # a resumed run continues the epoch where it stopped
        for index in rank_batches(len(train), stage.batch_size, processes, rank, epoch, seed)[offset:]:
            batch = train[index].to(device)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(stage, step // stage.grad_accum)
            if sharded:
                loss = _loss(model, batch, name, stage.attention_ce) / stage.grad_accum
                loss.backward()
                if (step + 1) % stage.grad_accum == 0 or step + 1 == stage.steps:
                    average_replicated_gradients(params, processes)
                    optimizer.step()
                    optimizer.zero_grad()
            else:
                with accelerator.accumulate(model):
                    loss = _loss(model, batch, name, stage.attention_ce) / stage.grad_accum
                    accelerator.backward(loss)
                    optimizer.step()
                    optimizer.zero_grad()
            tokens += batch.numel() * processes
            step += 1
            train_loss = float(accelerator.reduce(loss.detach() * stage.grad_accum, "mean"))  # over processes
            bar.update(1)
            bar.set_postfix(loss=f"{train_loss:.4g}")
            record = {"step": step, "train_loss": train_loss, "lr": optimizer.param_groups[0]["lr"]}
            if step % stage.eval_every == 0 or step == stage.steps:
                evaluate(record)
                accelerator.print(f"{name} step {step}: eval loss {record['eval_loss']:.4g}, "
                                  f"eval perplexity {math.exp(min(record['eval_lm_loss'], 50)):.2f}")
            history.append(record)
            if step % stage.checkpoint_every == 0 or step == stage.steps:
                if sharded:  # every process writes its shard
                    save_sharded_checkpoint(checkpoint, step, model, optimizer, history, accelerator)
                elif accelerator.is_main_process:
                    _save_checkpoint(checkpoint, step, accelerator.unwrap_model(model), optimizer, history)
            if step >= stage.steps:
                break
    bar.close()
    seconds = time.perf_counter() - t0
    digests = _rank_digests(accelerator, model if sharded else accelerator.unwrap_model(model), name)
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    return {"steps": step, "tokens_this_run": tokens, "seconds_this_run": seconds,
            "tokens_per_minute": 60 * tokens / seconds if seconds > 0 else None, "rank_digests": digests,
            "eval_loss_first": evals[0] if evals else None, "eval_loss_last": evals[-1] if evals else None,
            "history": history}


def _rank_digests(accelerator, model, stage: str) -> list[str]:
    """Every process's digest of its trainable parameters; they must agree (gradients are averaged,
    every process applies the same update), or the run stops here instead of saving one rank's view."""
    from accelerate.utils import gather_object

    digests = gather_object([trainable_digest(model)]) if accelerator.num_processes > 1 else [trainable_digest(model)]
    if len(set(digests)) > 1:
        raise RuntimeError(f"{stage}: the processes hold different trained parameters ({digests}); "
                           "gradients were not synchronised")
    return digests


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


def _with_lora(model, stage2: StageConfig, seed: int):
    """peft LoRA on the stage's targets, initialised from `seed` alone (the same adapters whether they
    are added before stage 1, as sharded runs do, or after it)."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=stage2.lora_r, lora_alpha=stage2.lora_alpha, target_modules=stage2.lora_targets,
                      lora_dropout=0.0, bias="none")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return get_peft_model(model, lora)


def _train_only(model, stage: str, stage2: StageConfig) -> None:
    """requires_grad for a stage: stage 1 the patch's parameters; stage 2 LoRA and, with
    train_attnpatch, the patch's parameters too."""
    for name, p in model.named_parameters():
        if stage == "stage1":
            p.requires_grad_(_is_attnpatch(name))
        else:
            p.requires_grad_("lora_" in name or (stage2.train_attnpatch and _is_attnpatch(name)))
    if stage == "stage2" and not _trainable(model):
        raise PatchError("stage2 has nothing to train: set lora_r > 0, or train_attnpatch: true for a method "
                         "with parameters (list_methods() says which train)")


def _checkpointing(model, enabled: bool) -> bool:
    """transformers' gradient checkpointing on or off for the next stage (non-reentrant: works with
    frozen inputs, LoRA and FSDP); returns whether the model now recomputes."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # transformers 5.24 renamed these "activation checkpointing"; earlier releases have only the old names
    active = getattr(base, "is_activation_checkpointing", None)
    active = base.is_gradient_checkpointing if active is None else active
    if enabled and not active:
        if hasattr(base, "activation_checkpointing_enable"):
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif active and not enabled:
        (getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable)()
    now = getattr(base, "is_activation_checkpointing", None)
    return bool(base.is_gradient_checkpointing if now is None else now)


def convert(config: RecipeConfig) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from ..models import load_model
    from ..runtime.dispatch import exact_attention_everywhere
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
            patch_model(model, PatchConfig.from_dict(config.attention))
        if use_lora:
            model = _with_lora(model, config.stage2, config.seed)
        for p in model.parameters():
            p.requires_grad_(False)
        replicated = [p for name, p in model.named_parameters() if _is_attnpatch(name)]
        blocks = shard_model(model, accelerator.device, accelerator.num_processes, replicated,
                             cpu_offload=fsdp.cpu_offload, reshard_after_forward=fsdp.reshard_after_forward)
        summary["fsdp"] = {"blocks": blocks, "cpu_offload": fsdp.cpu_offload,
                           "reshard_after_forward": fsdp.reshard_after_forward}
        accelerator.print(f"fsdp: {blocks} blocks sharded over {accelerator.num_processes} processes")
        with exact_attention_everywhere():  # the base model's attention: the dense reference
            dense_loss = _evaluate(model, evaluation, "stage2", batch, accelerator)
    else:
        model.to(accelerator.device)
        dense_loss = _evaluate(model, evaluation, "stage2", batch, accelerator)
    summary["dense_eval_perplexity"] = math.exp(min(dense_loss, 50.0))
    if config.prune.ratio:
        summary["pruning"] = _prune(model, config.prune, train)
        accelerator.print(f"pruned {summary['pruning']['heads_removed']} heads: "
                          f"{summary['pruning']['params_before'] / 1e6:.2f}M -> "
                          f"{summary['pruning']['params_after'] / 1e6:.2f}M parameters")
    if config.attention is not None and not sharded:
        patch_model(model, PatchConfig.from_dict(config.attention))
    summary["untrained_eval_perplexity"] = math.exp(min(_evaluate(model, evaluation, "stage2", batch,
                                                                  accelerator), 50.0))
    accelerator.print(f"eval perplexity: dense {summary['dense_eval_perplexity']:.2f}, "
                      f"patched before training {summary['untrained_eval_perplexity']:.2f}")

    if config.stage1.steps:
        _train_only(model, "stage1", config.stage2)
        recomputes = _checkpointing(model, config.stage1.gradient_checkpointing)
        summary["stages"]["stage1"] = run_stage("stage1", model, config.stage1, train, evaluation, accelerator, out,
                                                config.seed)
        summary["stages"]["stage1"]["gradient_checkpointing"] = recomputes
        model = model if sharded else accelerator.unwrap_model(model)
    if config.stage2.steps:
        if use_lora and not sharded:
            model = _with_lora(model, config.stage2, config.seed)
        _train_only(model, "stage2", config.stage2)
        recomputes = _checkpointing(model, config.stage2.gradient_checkpointing)
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
                model = _with_lora(model, config.stage2, config.seed)
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
        save_patched(model, final)
        tokenizer.save_pretrained(final)
        summary["final_state_digest"] = state_digest(model)  # what this process held when it saved final/
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
