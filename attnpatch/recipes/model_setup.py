"""What a recipe's model is set up with before and between stages: dtypes, which parameters train,
LoRA, gradient checkpointing (shared by training, sharding and the dry run)."""

from __future__ import annotations

import torch

from ..api import patched_methods
from ..api.checkpoints import is_attnpatch_key as is_attnpatch
from ..errors import PatchError
from .config import StageConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def trainable(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def transfer_modules(model) -> list[torch.nn.Module]:
    """The modules the patched methods train in attention transfer besides attnpatch_ parameters
    (found through the patch record of the model peft may wrap)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return [module for method in patched_methods(base) for module in method.transfer_modules()]


def with_lora(model, stage2: StageConfig, seed: int):
    """peft LoRA on the stage's targets, initialised from `seed` alone (the same adapters whether they
    are added before stage 1, as sharded runs do, or after it)."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=stage2.lora_r, lora_alpha=stage2.lora_alpha, target_modules=stage2.lora_targets,
                      lora_dropout=0.0, bias="none")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return get_peft_model(model, lora)


def train_only(model, stage: str, stage2: StageConfig) -> None:
    """requires_grad for a stage: stage 1 the patch's parameters; stage 2 LoRA and, with
    train_attnpatch, the patch's parameters too."""
    for name, p in model.named_parameters():
        if stage == "stage1":
            p.requires_grad_(is_attnpatch(name))
        else:
            p.requires_grad_("lora_" in name or (stage2.train_attnpatch and is_attnpatch(name)))
    if stage == "stage1":  # structural methods' students keep the model's names (kv_merge's projections)
        for module in transfer_modules(model):
            for p in module.parameters(recurse=False):
                p.requires_grad_(True)
    if stage == "stage2" and not trainable(model):
        raise PatchError("stage2 has nothing to train: set lora_r > 0, or train_attnpatch: true for a method "
                         "with parameters (list_methods() says which train)")


def checkpointing(model, enabled: bool) -> bool:
    """transformers' gradient checkpointing on or off for the next stage (non-reentrant: works with
    frozen inputs, LoRA and FSDP); returns whether the model now recomputes."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    active = _recomputes(base)
    if enabled and not active:
        if hasattr(base, "activation_checkpointing_enable"):
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif active and not enabled:
        (getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable)()
    return _recomputes(base)


def _recomputes(base) -> bool:
    # transformers 5.24 renamed these "activation checkpointing"; earlier releases have only the old names
    active = getattr(base, "is_activation_checkpointing", None)
    return bool(base.is_gradient_checkpointing if active is None else active)
