"""One training stage of a recipe, on one process or many: the data order and its sharding, the
loss of each stage, sharded evaluation, the learning-rate schedule, checkpoints and the check that
every process holds the same trained parameters."""

from __future__ import annotations

import hashlib
import math
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import PatchError
from ..runtime.modes import attention_transfer
from .config import StageConfig
from .model_setup import is_attnpatch, trainable


def stage_loss(model, batch: torch.Tensor, stage: str, attention_ce: float = 0.0) -> torch.Tensor:
    if stage == "stage1":
        with attention_transfer(attention_ce) as losses:
            model(input_ids=batch, use_cache=False)
        if not losses:
            raise RuntimeError("stage 1 found no trainable patched attention: does the method train parameters?")
        return torch.stack(losses).mean()
    return model(input_ids=batch, labels=batch, use_cache=False).loss


@torch.no_grad()
def evaluate_loss(model, blocks: torch.Tensor, stage: str, batch_size: int, accelerator, attention_ce: float = 0.0) -> float:
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
            total += float(stage_loss(model, batch, stage, attention_ce)) * len(batch)
            continue
        for j in range(len(batch)):  # the last batch holds padding: block by block, padding weighs nothing
            total += float(stage_loss(model, batch[j : j + 1], stage, attention_ce)) * float(w[j])
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


def _digest(named: dict[str, torch.Tensor]) -> str:
    """sha256 of the tensors' float32 bytes, names sorted (sharded tensors gathered whole first)."""
    from .sharding import full_tensor

    digest = hashlib.sha256()
    for name, t in sorted(named.items()):
        digest.update(name.encode())
        digest.update(full_tensor(t.detach()).float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def trainable_digest(model) -> str:
    """Digest of the trainable parameters: equal digests mean equal parameters."""
    return _digest(trainable(model))


def state_digest(model) -> str:
    """Digest of every tensor of the state dict, for "final/ holds what was trained"."""
    return _digest(model.state_dict())


def _save_checkpoint(directory: Path, step: int, model, optimizer, history: list) -> None:
    tmp = directory.with_name(directory.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    torch.save({"step": step, "trainable": {k: v.detach().cpu() for k, v in trainable(model).items()},
                "optimizer": optimizer.state_dict(), "history": history, "rng": torch.get_rng_state()},
               tmp / "checkpoint.pt")
    if directory.exists():
        shutil.rmtree(directory)
    tmp.rename(directory)


def _load_checkpoint(directory: Path, model, optimizer) -> tuple[int, list]:
    state = torch.load(directory / "checkpoint.pt", weights_only=False)
    params = trainable(model)
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

    named = trainable(model)
    params = list(named.values())
    # with attnpatch_lr the patch's parameters form a group of their own; each group's rate is lr times its
    # scale, kept beside the optimizer (a checkpoint's param_groups replace the optimizer's on resume)
    own = {n for n in named if stage.attnpatch_lr is not None and is_attnpatch(n)}
    groups = [([p for n, p in named.items() if n not in own], 1.0),
              ([named[n] for n in own], (stage.attnpatch_lr or stage.lr) / stage.lr)]
    groups = [(group, scale) for group, scale in groups if group]
    lr_scales = [scale for _, scale in groups]
    optimizer = torch.optim.AdamW([{"params": group} for group, _ in groups], lr=stage.lr,
                                  weight_decay=stage.weight_decay)
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
        record["eval_loss"] = evaluate_loss(model, evaluation, name, stage.batch_size, accelerator, stage.attention_ce)
        if name == "stage1":  # also the model's own next-token loss, to follow perplexity
            record["eval_lm_loss"] = evaluate_loss(model, evaluation, "stage2", stage.batch_size, accelerator)
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
            for group, scale in zip(optimizer.param_groups, lr_scales):
                group["lr"] = learning_rate(stage, step // stage.grad_accum) * scale
            if sharded:
                loss = stage_loss(model, batch, name, stage.attention_ce) / stage.grad_accum
                loss.backward()
                if (step + 1) % stage.grad_accum == 0 or step + 1 == stage.steps:
                    average_replicated_gradients(params, processes)
                    optimizer.step()
                    optimizer.zero_grad()
            else:
                with accelerator.accumulate(model):
                    loss = stage_loss(model, batch, name, stage.attention_ce) / stage.grad_accum
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
