"""The attention-free floor: the same model whose attention costs nothing.

Each query's output is its own token's value and no cache is kept, so what remains is everything
but attention (embeddings, projections, MLPs, norms, the head). Speed is reported against this
floor as well as against dense SDPA: "x times dense" alone hides how much of a step attention
still costs. Only transformers models with the attention interface (all supported decoders, ViT,
CLIP, SigLIP) can be set to it.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from transformers import AttentionInterface

FLOOR_IMPLEMENTATION = "attnpatch_floor"


def floor_attention(module, query, key, value, attention_mask, **kwargs):
    """Attention that costs nothing: each query's output is the value of its own token (GQA repeated)."""
    groups = query.shape[1] // value.shape[1]
    own = value[:, :, -query.shape[2]:]
    return own.repeat_interleave(groups, 1).transpose(1, 2).contiguous(), None


@contextmanager
def attention_free(model: nn.Module):
    """Within the block, `model` runs with floor attention (no cache should be used); restored after."""
    from ..api.patching import is_patched

    if is_patched(model):
        raise ValueError("attention_free needs the dense model: unpatch_model(model) first, or use a copy")
    if not hasattr(model, "set_attn_implementation"):
        raise TypeError(f"{type(model).__name__} has no set_attn_implementation: the floor needs a transformers "
                        "model that uses the attention interface")
    AttentionInterface.register(FLOOR_IMPLEMENTATION, floor_attention)
    previous = model.config._attn_implementation
    model.set_attn_implementation(FLOOR_IMPLEMENTATION)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)


@torch.no_grad()
def floor_step(model: nn.Module, token: torch.Tensor, position: int) -> torch.Tensor:
    """One decoding step of the floor at `position` (no cache): the logits of the last token."""
    positions = torch.full((token.shape[0], 1), position, device=token.device, dtype=torch.long)
    return model(input_ids=token, position_ids=positions, use_cache=False).logits[:, -1:]
