"""Fusing a group of kv heads into one by their principal components (kv_merge's "pca" fusion),
with no model knowledge.

Values: the group's stacked value heads (m*D rows) have covariance W E[x x^T] W^T; the merged head
is their top D principal components, v' = U^T v, and since v_j ~ U_j v' (U_j: member j's D rows of
U), the output projection of every query head reading member j absorbs U_j. Keys: RoPE turns dims
f and f + D/2 of every head by one angle, so per frequency the members' keys form a complex vector
z_f (one entry per member) and the merged key is its principal direction, c_f = u_f^H z_f; then
z_{j,f} ~ u_{j,f} c_f, and q.k_j ~ Re(conj(conj(u_{j,f}) q_f) c_f): the queries reading member j
are multiplied by conj(u_{j,f}) per frequency, which commutes with RoPE. With measured input
covariance these are the keys' and values' principal components; without, the projections' SVD.
A group of one head is an exact change of coordinates.
"""

from __future__ import annotations

import torch


def _pairs(rows: torch.Tensor) -> torch.Tensor:
    """(..., D, inputs) -> (..., D/2, inputs) complex: row f + i * row f + D/2."""
    half = rows.shape[-2] // 2
    return torch.complex(rows[..., :half, :], rows[..., half:, :])


def _unpairs(pairs: torch.Tensor) -> torch.Tensor:
    return torch.cat([pairs.real, pairs.imag], dim=-2)


def principal_merge(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, groups, group_size: int,
                    size: int, covariance: torch.Tensor | None = None):
    """q, k, v: projection rows with the bias as the last column (float64); out: the output
    projection's weight. Returns (q', k', v', out') with one key and value head per group: the
    merged heads in group order, every query head's rows and output columns adjusted."""
    sigma = torch.eye(k.shape[1], dtype=k.dtype) if covariance is None else covariance.to(k.dtype)
    q, out = q.clone(), out.clone()
    merged_keys, merged_values = [], []
    for members in groups:
        keys = _pairs(torch.stack([k[i * size:(i + 1) * size] for i in members]))  # (m, F, inputs)
        per_frequency = keys.transpose(0, 1)  # (F, m, inputs)
        energy = per_frequency @ sigma.to(keys.dtype) @ per_frequency.conj().transpose(1, 2)
        direction = torch.linalg.eigh(energy)[1][..., -1]  # (F, m): the top eigenvector
        merged_keys.append(_unpairs((direction.conj()[..., None] * per_frequency).sum(1)))
        values = torch.cat([v[i * size:(i + 1) * size] for i in members])  # (m*D, inputs)
        basis = torch.linalg.eigh(values @ sigma @ values.T)[1].flip(-1)[:, :size]  # (m*D, D)
        merged_values.append(basis.T @ values)
        for j, i in enumerate(members):
            share = basis[j * size:(j + 1) * size]  # v_i ~ share @ v'
            for h in range(i * group_size, (i + 1) * group_size):
                block = slice(h * size, (h + 1) * size)
                q[block] = _unpairs(_pairs(q[block]) * direction[:, j].conj()[:, None])
                out[:, block] = out[:, block] @ share
    return q, torch.cat(merged_keys), torch.cat(merged_values), out
