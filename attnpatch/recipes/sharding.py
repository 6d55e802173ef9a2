"""Fully sharded training for recipes (torch FSDP2): parameters, gradients and optimizer state split
across the processes, so a model that fits no single device trains on several.

The recipe shards the model itself (each transformer block, then the root, with `fully_shard`) on
whatever backend the processes joined with (nccl on GPUs, gloo on CPU), so the same code runs in CI on
two CPU processes and on a GPU node. Everything that trains in either stage exists before sharding:
the patch's parameters and the LoRA adapters (LoRA's B starts at zero, so stage 1 computes exactly what
it would without them); stages only switch `requires_grad`. The patch's own parameters (feature maps,
gates: small) stay whole on every process, outside FSDP, and their gradients are averaged explicitly:
stage 1's per-layer losses never flow back through a block's output, which is where FSDP's backward
hooks live, so FSDP would never collect those gradients. Checkpoints are sharded
(torch.distributed.checkpoint: each process writes its part), `final/` is assembled from the full state
dict on the main process.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..errors import PatchError
from .config import FsdpConfig


def sharding_settings(recipe: FsdpConfig) -> FsdpConfig | None:
    """What to shard with: the recipe's `fsdp` section when enabled, else what a launch config with
    `distributed_type: FSDP` asked for (its fsdp_offload_params, fsdp_reshard_after_forward); None for
    no sharding. accelerate is then told not to wrap the model itself: the recipe shards it, one code
    path on every backend."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        os.environ["ACCELERATE_USE_FSDP"] = "false"
        if not recipe.enabled:
            return FsdpConfig(
                enabled=True,
                cpu_offload=os.environ.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true",
                reshard_after_forward=os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() != "false")
    return recipe if recipe.enabled else None


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks (the classes transformers keeps whole when splitting a model)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise PatchError(f"fsdp: found no transformer blocks to shard in {type(base).__name__} "
                         f"(_no_split_modules={sorted(names)}); run this model without fsdp")
    return blocks


def shard_model(model: torch.nn.Module, device: torch.device, processes: int, replicated: list[torch.nn.Parameter],
                *, cpu_offload: bool = False, reshard_after_forward: bool = True) -> int:
    """fully_shard every transformer block, then the root, over one mesh of all processes, except the
    `replicated` parameters (moved to the device whole); returns the number of blocks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    mesh = init_device_mesh(device.type, (processes,))
    for p in replicated:
        p.data = p.data.to(device)
    options = {"mesh": mesh, "reshard_after_forward": reshard_after_forward, "ignored_params": set(replicated)}
    if cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy()
    blocks = transformer_blocks(model)
    for block in blocks:
        fully_shard(block, **options)
    fully_shard(model, **options)
    return len(blocks)


def average_replicated_gradients(params: list[torch.nn.Parameter], processes: int) -> None:
    """Mean over processes of the gradients of parameters FSDP does not manage (whole on every process)."""
    import torch.distributed as dist

    for p in params:
        if hasattr(p, "full_tensor"):  # sharded: FSDP reduce-scattered it already
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad.div_(processes)


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a sharded parameter (a collective: every process must call it)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict on the main process (on CPU); empty elsewhere. Every process calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


_PEFT_PREFIX = "base_model.model."


def _renamed(state: dict, rename) -> dict:
    """A model or optimizer state dict (from torch.distributed.checkpoint.state_dict) with its
    parameter names passed through `rename`."""
    if "state" in state and "param_groups" in state:  # optimizer
        return {"state": {rename(k): v for k, v in state["state"].items()},
                "param_groups": [{**g, "params": [rename(k) for k in g["params"]]} for g in state["param_groups"]]}
    return {rename(k): v for k, v in state.items()}


def _canonical(name: str) -> str:
    """Names without peft's wrapper prefix: a checkpoint of stage 1 written without LoRA resumes in a
    run that adds LoRA for stage 2 (as unsharded checkpoints do)."""
    return name.removeprefix(_PEFT_PREFIX)


def _state(model, optimizer, to_canonical: bool) -> dict:
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    state = {"model": get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=True)),
             "optimizer": get_optimizer_state_dict(model, optimizer)}
    return {k: _renamed(v, _canonical) for k, v in state.items()} if to_canonical else state


def save_sharded_checkpoint(directory: Path, step: int, model, optimizer, history: list, accelerator) -> None:
    """Each process writes its shard of what trains and of the optimizer state; the main process adds
    the step, history and RNG state. Written beside, then swapped in, so a crash keeps the last one."""
    import torch.distributed.checkpoint as dcp

    tmp = directory.with_name(directory.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    dcp.save(_state(model, optimizer, to_canonical=True), checkpoint_id=str(tmp / "shards"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        torch.save({"rng": torch.get_rng_state()}, tmp / "rng.pt")
        (tmp / "progress.json").write_text(json.dumps({"step": step, "history": history}))
        if directory.exists():
            shutil.rmtree(directory)
        tmp.rename(directory)
    accelerator.wait_for_everyone()


def state_names(model) -> list[str]:
    """The model's parameter names as its (model and optimizer) state dicts spell them."""
    return [name for name, _ in model.named_parameters()]


def load_sharded_checkpoint(directory: Path, model, optimizer) -> tuple[int, list]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = _state(model, optimizer, to_canonical=True)
    dcp.load(state, checkpoint_id=str(directory / "shards"))  # fills the tensors in place
    names = {_canonical(k): k for k in state_names(model)}
    original = {k: _renamed(v, lambda n: names.get(n, n)) for k, v in state.items()}
    set_state_dict(model, optimizer, model_state_dict=original["model"], optim_state_dict=original["optimizer"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))  # the frozen rest stays
    torch.set_rng_state(torch.load(directory / "rng.pt")["rng"])
    progress = json.loads((directory / "progress.json").read_text())
    return progress["step"], progress["history"]
