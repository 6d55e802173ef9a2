"""Exact softmax attention of a normalised call (what methods fall back to for the parts they keep
exact, and the teacher of attention transfer), with the call's mask and causality applied."""

from __future__ import annotations

import torch

from ..ops.attention_weights import attention_weights
from ..ops.reference import causal_mask, naive_attention


def sdpa_attention(call, allowed: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
    """Softmax attention of a call under a boolean mask (rows with no visible key give 0)."""
    q, k, v = call.query, call.key, call.value
    if call.softcap is not None:
        return naive_attention(q, k, v, allowed, causal=is_causal, scaling=call.scaling, softcap=call.softcap)
    grouped = q.shape[1] != k.shape[1]  # GQA: SDPA reads each kv head for its query group, no copies
    if allowed is None:
        if q.shape[-2] == 1 and not is_causal:  # a decoding step: the query group folded, as one_query_attention
            return one_query_attention(q, k, v, None, call.scaling, False)[0]
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=call.scaling,
                                                                enable_gqa=grouped)
    visible = allowed.any(dim=-1, keepdim=True)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed | ~visible, scale=call.scaling,
                                                           enable_gqa=grouped)
    return out * visible.to(out.dtype)


def one_query_attention(query, key, value, valid: torch.Tensor | None, scaling: float,
                        with_weights: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of one new token per sequence (a decoding step) over (B, Hkv, L, D) keys, of which
    `valid` (B, Hkv, L) may be attended (None: all). Each kv head's query group is folded into the
    query dimension, so keys and values are never repeated per query head. With `with_weights`
    the softmax is computed here and its weights, summed over each query group (B, Hkv, L, float32),
    come back with the output: the attention mass a scorer needs costs no second pass."""
    b, hq, _, d = query.shape
    folded = query.reshape(b, key.shape[1], hq // key.shape[1], d)
    if not with_weights:
        mask = None if valid is None else valid[:, :, None, :]
        out = torch.nn.functional.scaled_dot_product_attention(folded, key, value, attn_mask=mask, scale=scaling)
        return out.reshape(b, hq, 1, d), None
    scores = torch.matmul(folded.float() * scaling, key.float().transpose(-1, -2))  # scaled on the small side
    if valid is not None:
        scores = scores.masked_fill(~valid[:, :, None, :], float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    out = torch.matmul(weights.to(value.dtype), value)
    return out.reshape(b, hq, 1, d), weights.sum(dim=2)


def visible_keys(call) -> torch.Tensor | None:
    """The call's boolean mask joined with its causality (bottom-right aligned)."""
    allowed = call.mask
    if call.causal and call.query.shape[-2] > 1:
        causal = causal_mask(call.query.shape[-2], call.key.shape[-2], call.query.device)
        allowed = causal if allowed is None else allowed & causal
    return allowed


def exact_attention(call) -> torch.Tensor:
    """Exact softmax attention under the model's mask and causality (bottom-right aligned)."""
    lq, lk = call.query.shape[-2], call.key.shape[-2]
    if call.mask is None and (lq == 1 or (call.causal and lq == lk)):
        # no mask to build: SDPA's own causal kernel (top-left aligned, the same when lq == lk) is
        # what the model's SDPA path runs too, and much faster on CPU than an explicit mask
        return sdpa_attention(call, None, call.causal and lq > 1)
    return sdpa_attention(call, visible_keys(call), False)


def exact_attention_weights(call) -> torch.Tensor:
    """The (B, Hq, Lq, Lk) float32 softmax weights behind `exact_attention` (rows with no key are 0)."""
    return attention_weights(call.query, call.key, visible_keys(call), call.scaling, call.softcap)
