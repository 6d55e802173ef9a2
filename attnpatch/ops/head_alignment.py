"""Aligning attention heads before they are averaged (kv_merge's "aligned" fusion), with no model knowledge.

Two kv heads can compute the same attention in different coordinates: rotating a key head and the
queries that read it by the same rotation leaves every score q.k unchanged, and rotating a value
head while the output projection undoes it leaves the output unchanged. Averaging raw projections
ignores this; averaging after rotating each head onto the group's consensus (generalised
Procrustes) loses less. Key rotations must also commute with RoPE, so a key head turns by one
angle per RoPE frequency pair (dims f and f + D/2, rotate_half layout): a unit complex number per
pair. Value heads may turn by any orthogonal matrix.
"""

from __future__ import annotations

import torch


def as_complex_pairs(rows: torch.Tensor) -> torch.Tensor:
    """(..., D, inputs) head rows -> (..., D/2, inputs) complex: row f + i * row f + D/2."""
    half = rows.shape[-2] // 2
    return torch.complex(rows[..., :half, :].float(), rows[..., half:, :].float())


def rotate_pairs(rows: torch.Tensor, phases: torch.Tensor) -> torch.Tensor:
    """Turn each RoPE pair of (..., D, inputs) head rows by unit complex `phases` (..., D/2)."""
    turned = as_complex_pairs(rows) * phases[..., None]
    return torch.cat([turned.real, turned.imag], dim=-2).to(rows.dtype)


def key_phases(heads: torch.Tensor, iterations: int = 3) -> torch.Tensor:
    """heads (m, D, inputs): key rows of the heads to fuse -> (m, D/2) unit phases that bring each
    head's pairs onto the group's consensus (the first head's orientation at the start)."""
    pairs = as_complex_pairs(heads)
    target = pairs[0]
    for _ in range(iterations):
        overlap = (pairs.conj() * target).sum(-1)  # (m, D/2): the best phase maximises Re(overlap * conj(phase))
        phases = torch.where(overlap.abs() > 0, overlap / overlap.abs().clamp_min(1e-30), torch.ones_like(overlap))
        target = (pairs * phases[..., None]).mean(0)
    return phases


def value_rotations(heads: torch.Tensor, iterations: int = 3) -> torch.Tensor:
    """heads (m, D, inputs): value rows -> (m, D, D) orthogonal rotations onto the group's consensus."""
    rows = heads.float()
    target = rows[0]
    for _ in range(iterations):
        u, _, vh = torch.linalg.svd(target @ rows.transpose(1, 2))  # (m, D, D): argmax tr(R W T^T) = U V^T
        rotations = u @ vh
        target = (rotations @ rows).mean(0)
    return rotations
