"""Attention-sink calibration (ACT): find the keys that soak up attention without being the first
token, scale the attention they get by beta and give the removed mass to the other keys of the
row in proportion to what they already had.

For one head and one sequence with Nq real queries and Nk real keys, key j (not the first real
key) is a sink when the attention it receives, averaged over the queries, exceeds alpha times the
uniform share: mean_i A[i, j] > alpha / Nk. In a prefill (Nq = Nk = N) that is sum_i A[i, j] > alpha,
the column sum against the average column sum 1. Each row i then becomes
    A'[i, s] = beta A[i, s] on sinks,   A'[i, j] = A[i, j] (1 - beta S_i) / (1 - S_i) elsewhere,
with S_i the row's sink mass, so rows still sum to 1 (a row that is all sink is left as is).

Shapes follow ops/reference.py; `allowed` (broadcastable to (B, Hq, Lq, Lk), True = may attend)
is the mask joined with causality. Both passes run over blocks of queries, so no more than
(B, Hq, block, Lk) weights exist at a time.
"""

from __future__ import annotations

import torch

from .attention_weights import attention_weights
from .reference import repeat_kv


def _rows(allowed: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
    if allowed is None or allowed.shape[-2] == 1:  # None, or one row broadcast to every query
        return allowed
    return allowed[..., start:stop, :]


@torch.no_grad()  # a discrete choice: no gradient flows through which keys are sinks
def sink_keys(query, key, allowed, scaling: float, alpha: float, softcap: float | None = None,
              key_valid: torch.Tensor | None = None, block: int = 256) -> torch.Tensor:
    """(B, Hq, Lk) bool: per head, the non-initial keys whose mean received attention exceeds
    alpha / (real keys). key_valid (B, Lk) marks real tokens (None: all); a query counts when the
    token at its position is real (queries are the last Lq keys)."""
    b, hq, lq, _ = query.shape
    lk = key.shape[-2]
    valid = torch.ones(b, lk, dtype=torch.bool, device=query.device) if key_valid is None else key_valid
    query_weight = valid[:, lk - lq:].float()[:, None, :, None]  # (B, 1, Lq, 1)
    received = torch.zeros(b, hq, lk, dtype=torch.float32, device=query.device)
    for start in range(0, lq, block):
        stop = min(start + block, lq)
        weights = attention_weights(query[..., start:stop, :], key, _rows(allowed, start, stop), scaling, softcap)
        received += (weights * query_weight[:, :, start:stop]).sum(dim=-2)
    queries = query_weight.sum(dim=(1, 2, 3)).clamp_min(1.0)[:, None, None]  # (B, 1, 1)
    keys = valid.sum(dim=-1).float()[:, None, None]
    sinks = (received / queries > alpha / keys) & valid[:, None, :]
    first = valid.float().argmax(dim=-1)  # the first real token keeps its attention
    sinks[torch.arange(b, device=query.device), :, first] = False
    return sinks


def calibrated_weights(weights: torch.Tensor, sinks: torch.Tensor, beta: float) -> torch.Tensor:
    """Rows of `weights` (.., Lq, Lk) with the mass on `sinks` (.., 1, Lk) scaled by beta and the
    removed mass spread over the other keys in proportion to their weight."""
    sink_mass = (weights * sinks).sum(dim=-1, keepdim=True)
    rest = 1.0 - sink_mass
    movable = rest > 1e-6  # a row whose mass is all on sinks has nowhere to move it
    boost = torch.where(movable, (1.0 - beta * sink_mass) / rest.clamp_min(1e-6), torch.ones_like(rest))
    sink_scale = torch.where(movable, torch.full_like(rest, beta), torch.ones_like(rest))
    return torch.where(sinks, weights * sink_scale, weights * boost)


def sink_calibrated_attention(query, key, value, allowed, scaling: float, beta: float, alpha: float,
                              softcap: float | None = None, key_valid: torch.Tensor | None = None,
                              block: int = 256) -> torch.Tensor:
    """ACT attention (module docstring): (B, Hq, Lq, D) in the query's dtype."""
    sinks = sink_keys(query, key, allowed, scaling, alpha, softcap, key_valid, block)[:, :, None, :]
    values = repeat_kv(value, query.shape[1] // value.shape[1]).float()
    out = torch.empty_like(query)
    for start in range(0, query.shape[-2], block):
        stop = min(start + block, query.shape[-2])
        weights = attention_weights(query[..., start:stop, :], key, _rows(allowed, start, stop), scaling, softcap)
        out[..., start:stop, :] = torch.matmul(calibrated_weights(weights, sinks, beta), values).to(query.dtype)
    return out


def massive_tokens(hidden: torch.Tensor, tau: float, dims: list[int] | None = None,
                   valid: torch.Tensor | None = None) -> torch.Tensor:
    """(B, L) bool: tokens whose hidden state has a massive activation, max_d |h[d]| / median |h| > tau
    over the sink dimensions `dims` (the median keeps the ratio independent of the width); without
    dims, the dimensions where the first real token's own ratio exceeds tau (the text sink's
    massive dimensions, found per sequence)."""
    h = hidden.float().abs()
    ratio = h / h.median(dim=-1, keepdim=True).values.clamp_min(1e-12)  # (B, L, D)
    if dims is not None:
        return ratio[..., dims].amax(-1) > tau
    first = valid.float().argmax(-1) if valid is not None else torch.zeros(h.shape[0], dtype=torch.long, device=h.device)
    sink_dims = ratio[torch.arange(h.shape[0], device=h.device), first] > tau  # (B, D)
    return (ratio * sink_dims[:, None, :]).amax(-1) > tau


def visual_sink_redistribution(query, key, value, allowed, scaling: float, image: torch.Tensor, sinks: torch.Tensor,
                               p: float, rho: float, softcap: float | None = None, block: int = 256) -> torch.Tensor:
    """VAR: in image-centric heads, a share p of the attention each row gives visual sink tokens
    moves to the other image tokens, in proportion to their weight.

    image, sinks: (B, Lk) bool (sinks within image). A head is image-centric for a sequence when
    the queries that see an image give most of their image attention to non-sink image tokens:
    sum over those queries of non-sink image mass / image mass >= rho (decided per call)."""
    image_f = image[:, None, None, :].float()
    sink_f = (sinks & image)[:, None, None, :].float()
    values = repeat_kv(value, query.shape[1] // value.shape[1]).float()
    lq = query.shape[-2]
    b, hq = query.shape[:2]
    image_mass = torch.zeros(b, hq, device=query.device)
    other_mass = torch.zeros(b, hq, device=query.device)
    for start in range(0, lq, block):
        stop = min(start + block, lq)
        weights = attention_weights(query[..., start:stop, :], key, _rows(allowed, start, stop), scaling, softcap)
        on_image = (weights * image_f).sum(-1)
        image_mass += on_image.sum(-1)
        other_mass += (on_image - (weights * sink_f).sum(-1)).sum(-1)
    centric = (other_mass >= rho * image_mass) & (image_mass > 0)  # (B, Hq)
    scale = centric.float()[:, :, None, None] * p  # share moved, 0 outside image-centric heads
    out = torch.empty_like(query)
    for start in range(0, lq, block):
        stop = min(start + block, lq)
        weights = attention_weights(query[..., start:stop, :], key, _rows(allowed, start, stop), scaling, softcap)
        sink_mass = (weights * sink_f).sum(-1, keepdim=True)
        other = ((weights * image_f).sum(-1, keepdim=True) - sink_mass)
        receivers = other > 1e-9
        moved = torch.where(receivers, scale * sink_mass, torch.zeros_like(sink_mass))
        gain = moved / other.clamp_min(1e-9)
        weights = weights - weights * sink_f * torch.where(receivers, scale, torch.zeros_like(scale)) \
            + weights * (image_f - sink_f) * gain
        out[..., start:stop, :] = torch.matmul(weights, values).to(query.dtype)
    return out
