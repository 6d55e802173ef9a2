"""The math of SeerAttention's learned block gate (`seer_gate`), with no model knowledge.

A query block is summarised by the mean of its queries, a key block by the max, min and mean of
its keys; per head, learned maps take both to a small gate space, and the softmax of their scaled
dot products over the admissible key blocks says how much attention each key block should get.
The gate learns from the model itself: the target of a query block is the exact attention map
max-pooled over (query block x key block) tiles, normalised over key blocks (self-distillation).
"""

from __future__ import annotations

import math

import torch

from .block_sparse import BlockLayout, grid
from .block_selection import _block_stat, pooled_queries
from .sparse_patterns import _allowed_blocks, layout_from_block_mask


def pooled_keys(key: torch.Tensor, valid: torch.Tensor | None, block_size: int) -> torch.Tensor:
    """(B, Hkv, nK, 3D): max, min and mean of each key block's valid keys."""
    return torch.cat([_block_stat(key, valid, block_size, how) for how in ("max", "min", "mean")], dim=-1)


def admissible_blocks(lq: int, lk: int, block_size: int, causal: bool, valid: torch.Tensor | None, device):
    """(first, allowed (B|1, 1, nQ, nK)): key blocks a query block may attend (causal, not padding only)."""
    first, _, nq, nk = grid(lq, lk, block_size, causal)
    _, _, allowed = _allowed_blocks(first, nq, nk, causal, device)
    allowed = allowed[None, None]
    if valid is not None:
        has_key = torch.nn.functional.pad(valid, (0, nk * block_size - lk)).view(valid.shape[0], nk, -1).any(-1)
        allowed = allowed & has_key[:, None, None, :]
    return first, allowed


_EXCLUDED = -1e9  # logit of blocks the gate does not rank: finite, so a row with nothing to rank stays finite


def fixed_blocks(lq: int, lk: int, block_size: int, causal: bool, sink_blocks: int, local_blocks: int,
                 device) -> torch.Tensor:
    """(nQ, nK) the key blocks every query block computes anyway (local and sink): nothing to rank."""
    first, _, nq, nk = grid(lq, lk, block_size, causal)
    qb, kb, _ = _allowed_blocks(first, nq, nk, causal, device)
    return ((qb - kb) < local_blocks) & ((qb - kb) > -local_blocks) | (kb < sink_blocks)


def gate_log_probs(query: torch.Tensor, key: torch.Tensor, gate_query: torch.Tensor, gate_key: torch.Tensor,
                   block_size: int, causal: bool, valid: torch.Tensor | None = None,
                   exclude: torch.Tensor | None = None) -> torch.Tensor:
    """(B, Hq, nQ, nK) log-probabilities of the gate over the admissible key blocks not in `exclude`
    (the blocks computed anyway); about -1e9 elsewhere. gate_query (Hq, D, G) and gate_key
    (Hkv, 3D, G) are the per-head maps to the gate space."""
    lq, lk = query.shape[-2], key.shape[-2]
    groups = query.shape[1] // key.shape[1]
    q = torch.einsum("bhnd,hdg->bhng", pooled_queries(query.float(), lk, block_size, causal), gate_query.float())
    k = torch.einsum("bhnd,hdg->bhng", pooled_keys(key, valid, block_size), gate_key.float())
    logits = q @ k.repeat_interleave(groups, dim=1).transpose(-1, -2) / math.sqrt(q.shape[-1])
    _, ranked = admissible_blocks(lq, lk, block_size, causal, valid, query.device)
    if exclude is not None:
        ranked = ranked & ~exclude
    return logits.masked_fill(~ranked, _EXCLUDED).log_softmax(-1)


def block_attention_target(weights: torch.Tensor, block_size: int, causal: bool,
                           exclude: torch.Tensor | None = None) -> torch.Tensor:
    """(B, Hq, nQ, nK): exact attention weights (B, Hq, Lq, Lk) max-pooled over block tiles of the
    call's grid and normalised over key blocks, leaving out the `exclude`d ones (the blocks computed
    anyway: the gate only has to rank the others); rows with nothing left stay 0."""
    lq, lk = weights.shape[-2:]
    _, pad, nq, nk = grid(lq, lk, block_size, causal)
    tiles = torch.nn.functional.pad(weights.float(), (0, nk * block_size - lk, pad, nq * block_size - lq - pad))
    pooled = tiles.unflatten(-1, (nk, block_size)).unflatten(-3, (nq, block_size)).amax(dim=(-3, -1))
    if exclude is not None:
        pooled = pooled.masked_fill(exclude, 0.0)
    return pooled / pooled.sum(-1, keepdim=True).clamp_min(1e-30)


def gate_distillation_loss(log_probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """KL(target || gate), summed over key blocks and averaged over the query blocks that attend anything."""
    has_target = target > 0
    terms = torch.where(has_target, target * (target.clamp_min(1e-30).log() - log_probs), torch.zeros_like(target))
    rows = has_target.any(-1)
    return terms.sum(-1)[rows].mean() if bool(rows.any()) else log_probs.sum() * 0


def threshold_layout(probs: torch.Tensor, lq: int, lk: int, block_size: int, *, causal: bool, threshold: float,
                     sink_blocks: int, local_blocks: int, valid: torch.Tensor | None = None) -> BlockLayout:
    """Per query block and kv head: the local and sink blocks, and every admissible key block whose
    gate probability `probs` (B, Hkv, nQ, nK) is at least `threshold`."""
    first, allowed = admissible_blocks(lq, lk, block_size, causal, valid, probs.device)
    fixed = fixed_blocks(lq, lk, block_size, causal, sink_blocks, local_blocks, probs.device)
    return layout_from_block_mask(allowed & (fixed | (probs >= threshold)), block_size, first)
