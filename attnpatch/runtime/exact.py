"""Exact softmax attention of a normalised call (what methods fall back to for the parts they keep
exact, and the teacher of attention transfer), with the call's mask and causality applied."""

from __future__ import annotations

import torch

from ..ops.kv_select import attention_weights
from ..ops.reference import causal_mask, naive_attention, repeat_kv


def sdpa_attention(call, allowed: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
    """Softmax attention of a call under a boolean mask (rows with no visible key give 0)."""
    q, k, v = call.query, call.key, call.value
    if call.softcap is not None:
        return naive_attention(q, k, v, allowed, causal=is_causal, scaling=call.scaling, softcap=call.softcap)
    groups = q.shape[1] // k.shape[1]
    if allowed is None:
        return torch.nn.functional.scaled_dot_product_attention(
            q, repeat_kv(k, groups), repeat_kv(v, groups), is_causal=is_causal, scale=call.scaling)
    visible = allowed.any(dim=-1, keepdim=True)
    out = torch.nn.functional.scaled_dot_product_attention(
        q, repeat_kv(k, groups), repeat_kv(v, groups), attn_mask=allowed | ~visible, scale=call.scaling)
    return out * visible.to(out.dtype)


def visible_keys(call) -> torch.Tensor | None:
    """The call's boolean mask joined with its causality (bottom-right aligned)."""
    allowed = call.mask
    if call.causal and call.query.shape[-2] > 1:
        causal = causal_mask(call.query.shape[-2], call.key.shape[-2], call.query.device)
        allowed = causal if allowed is None else allowed & causal
    return allowed


def exact_attention(call) -> torch.Tensor:
    """Exact softmax attention under the model's mask and causality (bottom-right aligned)."""
    return sdpa_attention(call, visible_keys(call), False)


def exact_attention_weights(call) -> torch.Tensor:
    """The (B, Hq, Lq, Lk) float32 softmax weights behind `exact_attention` (rows with no key are 0)."""
    return attention_weights(call.query, call.key, visible_keys(call), call.scaling, call.softcap)
