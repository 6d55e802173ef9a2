"""Kernel linear attention: feature maps and the O(n) causal / bidirectional forms.

out_i = phi(q_i)^T S_i / phi(q_i)^T z_i, with S_i = sum_j phi(k_j) v_j^T and z_i = sum_j phi(k_j)
over the keys query i may see (all keys, or j <= i when causal). The causal form runs in
chunks: exact quadratic attention inside a chunk plus a running state from the chunks before,
so prefill is O(n * chunk) and decoding carries a fixed-size state (S, z).

Shapes: phi(q) (B, Hq, Lq, F), phi(k) (B, Hkv, Lk, F), v (B, Hkv, Lk, Dv), Hq = G * Hkv.
The state is kept per kv head: S (B, Hkv, F, Dv), z (B, Hkv, F), always float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

_EPS = 1e-12
# Bound on the float32 bytes of per-chunk states materialised at once (prefix sums over chunks).
_STATE_BYTES_PER_STEP = 64 * 2**20


@dataclass
class LinearState:
    """Running sums of a causal linear attention: S = sum phi(k) v^T, z = sum phi(k)."""

    kv: torch.Tensor  # (B, Hkv, F, Dv) float32
    k_sum: torch.Tensor  # (B, Hkv, F) float32

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size() + self.k_sum.numel() * self.k_sum.element_size()


# ----------------------------------------------------------------------------- feature maps


class FeatureMap(nn.Module):
    """phi: (B, H, L, D) -> (B, H, L, F), non-negative so the normaliser stays positive."""

    def feature_dim(self, head_dim: int) -> int:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, is_query: bool) -> torch.Tensor:
        raise NotImplementedError


class EluFeatureMap(FeatureMap):
    """elu(x) + 1 (Katharopoulos et al.)."""

    def feature_dim(self, head_dim: int) -> int:
        return head_dim

    def forward(self, x, is_query):
        return nn.functional.elu(x) + 1.0


class ReluFeatureMap(FeatureMap):
    def feature_dim(self, head_dim: int) -> int:
        return head_dim

    def forward(self, x, is_query):
        return nn.functional.relu(x)


class TaylorFeatureMap(FeatureMap):
    """Second-order Taylor expansion of exp(q.k * scaling) (as in Based):
    phi(q).phi(k) = 1 + s + s^2 / 2 with s = q.k * scaling, which is > 0 for every s.
    The quadratic block keeps only the upper triangle of x x^T (diagonal / sqrt 2), which gives
    the same inner product with d(d+1)/2 instead of d^2 features."""

    def __init__(self, head_dim: int, scaling: float):
        super().__init__()
        self.input_scale = math.sqrt(scaling)
        rows, cols = torch.triu_indices(head_dim, head_dim)
        self.register_buffer("_rows", rows, persistent=False)
        self.register_buffer("_cols", cols, persistent=False)
        weight = torch.where(rows == cols, 1.0 / math.sqrt(2.0), 1.0)
        self.register_buffer("_pair_weight", weight, persistent=False)

    def feature_dim(self, head_dim: int) -> int:
        return 1 + head_dim + head_dim * (head_dim + 1) // 2

    def forward(self, x, is_query):
        x = x * self.input_scale
        pairs = x[..., self._rows] * x[..., self._cols] * self._pair_weight.to(x.dtype)
        return torch.cat([torch.ones_like(x[..., :1]), x, pairs], dim=-1)


class PerformerFeatureMap(FeatureMap):
    """FAVOR+ positive orthogonal random features: E[phi(q).phi(k)] = exp(q.k * scaling).

    phi(x) = exp(W x - |x|^2 / 2) / sqrt(m) with x pre-scaled by sqrt(scaling). Queries subtract
    their own row maximum (it cancels between numerator and normaliser); keys need no stabiliser
    since W x - |x|^2/2 <= |W_r|^2 / 2. The projection is a persistent buffer, so it is saved and
    reloaded with the model and outputs are reproducible.
    """

    def __init__(self, head_dim: int, scaling: float, num_features: int, seed: int):
        super().__init__()
        self.input_scale = math.sqrt(scaling)
        self.num_features = num_features
        generator = torch.Generator().manual_seed(seed)
        blocks = []
        for _ in range(math.ceil(num_features / head_dim)):
            q, r = torch.linalg.qr(torch.randn(head_dim, head_dim, generator=generator))
            # sign fix makes Q Haar-uniform; without it the kernel estimate is biased (~7% here)
            blocks.append((q * torch.sign(torch.diagonal(r))).T)
        directions = torch.cat(blocks, dim=0)[:num_features]
        norms = torch.randn(num_features, head_dim, generator=generator).norm(dim=-1, keepdim=True)
        self.register_buffer("projection", directions * norms)  # (m, D)

    def feature_dim(self, head_dim: int) -> int:
        return self.num_features

    def forward(self, x, is_query):
        x = x.float() * self.input_scale
        logits = x @ self.projection.float().T - 0.5 * (x * x).sum(-1, keepdim=True)
        if is_query:
            logits = logits - logits.amax(dim=-1, keepdim=True).detach()
        return torch.exp(logits) / math.sqrt(self.num_features)


class HedgehogFeatureMap(FeatureMap):
    """Learnable Hedgehog map, per head: phi(x) = [softmax(x W + b), softmax(-(x W + b))].

    W starts as the identity and b at zero, so training starts from a well-defined map.
    """

    def __init__(self, num_heads: int, head_dim: int, dtype=None, device=None):
        super().__init__()
        eye = torch.eye(head_dim, dtype=dtype, device=device)
        self.weight = nn.Parameter(eye.expand(num_heads, head_dim, head_dim).clone())
        self.bias = nn.Parameter(torch.zeros(num_heads, 1, head_dim, dtype=dtype, device=device))

    def feature_dim(self, head_dim: int) -> int:
        return 2 * head_dim

    def forward(self, x, is_query):
        projected = torch.einsum("bhld,hdf->bhlf", x, self.weight.to(x.dtype)) + self.bias.to(x.dtype)
        return torch.cat([torch.softmax(projected, dim=-1), torch.softmax(-projected, dim=-1)], dim=-1)


# ----------------------------------------------------------------------------- attention forms


def _group_queries(fq: torch.Tensor, kv_heads: int) -> torch.Tensor:
    b, hq, n, f = fq.shape
    return fq.reshape(b, kv_heads, hq // kv_heads, n, f)


def _ungroup(out: torch.Tensor) -> torch.Tensor:
    b, hkv, g, n, d = out.shape
    return out.reshape(b, hkv * g, n, d)


def zero_state(fk: torch.Tensor, v: torch.Tensor) -> LinearState:
    b, h, _, f = fk.shape
    return LinearState(
        kv=torch.zeros(b, h, f, v.shape[-1], dtype=torch.float32, device=fk.device),
        k_sum=torch.zeros(b, h, f, dtype=torch.float32, device=fk.device),
    )


def accumulate_state(state: LinearState, fk: torch.Tensor, v: torch.Tensor) -> LinearState:
    """State after also seeing keys fk (B, Hkv, L, F) and values v (B, Hkv, L, Dv)."""
    fk, v = fk.float(), v.float()
    return LinearState(kv=state.kv + fk.transpose(-1, -2) @ v, k_sum=state.k_sum + fk.sum(dim=-2))


def bidirectional_linear_attention(fq, fk, v, key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Every query sees every valid key. key_valid: (B, Lk) bool or None."""
    if key_valid is not None:
        fk = fk * key_valid[:, None, :, None].to(fk.dtype)
    state = accumulate_state(zero_state(fk, v), fk, v)
    grouped = _group_queries(fq.float(), fk.shape[1])  # (B, Hkv, G, Lq, F)
    num = grouped @ state.kv[:, :, None]
    den = grouped @ state.k_sum[:, :, None, :, None]
    return _ungroup(num / den.clamp_min(_EPS)).to(v.dtype)


def causal_linear_attention(
    fq: torch.Tensor,
    fk: torch.Tensor,
    v: torch.Tensor,
    *,
    state: LinearState | None = None,
    key_valid: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, LinearState]:
    """Causal linear attention in O(L * chunk_size), continuing from `state` (keys already seen).

    When Lk > Lq, the first Lk - Lq keys are a prefix that only the state absorbs (bottom-right
    alignment). Returns the output (B, Hq, Lq, Dv) and the state after all keys.
    """
    out_dtype = v.dtype
    fq, fk, v = fq.float(), fk.float(), v.float()
    if key_valid is not None:
        fk = fk * key_valid[:, None, :, None].to(fk.dtype)
    if state is None:
        state = zero_state(fk, v)
    lq, lk = fq.shape[-2], fk.shape[-2]
    if lk > lq:
        state = accumulate_state(state, fk[:, :, : lk - lq], v[:, :, : lk - lq])
        fk, v = fk[:, :, lk - lq :], v[:, :, lk - lq :]
    elif lk < lq:
        raise ValueError(f"causal linear attention needs at least as many keys as queries, got {lk} < {lq}")

    kv_heads, f, dv = fk.shape[1], fk.shape[-1], v.shape[-1]
    if lq == 0:
        return fq.new_zeros(*fq.shape[:-1], dv).to(out_dtype), state
    grouped_q = _group_queries(fq, kv_heads)  # (B, Hkv, G, L, F)
    if lq == 1:  # a decoding step: fold the token into the state, then read it (no chunk machinery)
        state = accumulate_state(state, fk, v)
        num = grouped_q @ state.kv[:, :, None]
        den = grouped_q @ state.k_sum[:, :, None, :, None]
        return _ungroup(num / den.clamp_min(_EPS)).to(out_dtype), state
    batch, groups = grouped_q.shape[0], grouped_q.shape[2]
    chunk = max(1, min(chunk_size, lq))
    per_chunk_bytes = batch * kv_heads * f * dv * 4
    chunks_per_step = max(1, _STATE_BYTES_PER_STEP // max(per_chunk_bytes, 1))
    intra_mask = torch.ones(chunk, chunk, dtype=torch.bool, device=fq.device).tril()

    outputs = []
    for start in range(0, lq, chunk * chunks_per_step):
        stop = min(lq, start + chunk * chunks_per_step)
        n = stop - start
        n_chunks = math.ceil(n / chunk)
        pad = n_chunks * chunk - n
        q_blk, k_blk, v_blk = grouped_q[..., start:stop, :], fk[:, :, start:stop], v[:, :, start:stop]
        if pad:  # zero features add nothing to any sum; padded query rows are dropped below
            q_blk = nn.functional.pad(q_blk, (0, 0, 0, pad))
            k_blk = nn.functional.pad(k_blk, (0, 0, 0, pad))
            v_blk = nn.functional.pad(v_blk, (0, 0, 0, pad))
        q_c = q_blk.reshape(batch, kv_heads, groups, n_chunks, chunk, f)
        k_c = k_blk.reshape(batch, kv_heads, 1, n_chunks, chunk, f)
        v_c = v_blk.reshape(batch, kv_heads, 1, n_chunks, chunk, dv)

        chunk_kv = k_c.transpose(-1, -2) @ v_c  # (B, Hkv, 1, nc, F, Dv)
        chunk_ksum = k_c.sum(dim=-2)  # (B, Hkv, 1, nc, F)
        prefix_kv = torch.cumsum(chunk_kv, dim=3) - chunk_kv + state.kv[:, :, None, None]
        prefix_ksum = torch.cumsum(chunk_ksum, dim=3) - chunk_ksum + state.k_sum[:, :, None, None]

        scores = (q_c @ k_c.transpose(-1, -2)) * intra_mask  # (B, Hkv, G, nc, C, C)
        num = q_c @ prefix_kv + scores @ v_c
        den = (q_c @ prefix_ksum[..., None]).squeeze(-1) + scores.sum(dim=-1)
        out = num / den.clamp_min(_EPS)[..., None]
        outputs.append(out.reshape(batch, kv_heads, groups, n_chunks * chunk, dv)[..., :n, :])
        state = LinearState(
            kv=state.kv + chunk_kv.sum(dim=3).squeeze(2), k_sum=state.k_sum + chunk_ksum.sum(dim=3).squeeze(2)
        )
    out = torch.cat(outputs, dim=-2)
    return _ungroup(out).to(out_dtype), state


def linear_attention_weights(fq, fk, *, causal: bool, key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """(B, Hq, Lq, Lk) weights phi(q) phi(k)^T * M / rowsum, in the inputs' dtype (differentiable)."""
    fk = fk.repeat_interleave(fq.shape[1] // fk.shape[1], dim=1)
    scores = fq @ fk.transpose(-1, -2)
    lq, lk = scores.shape[-2:]
    if causal:
        positions = torch.arange(lk, device=fq.device)
        scores = scores * (positions[lk - lq:, None] >= positions[None, :])
    if key_valid is not None:
        scores = scores * key_valid[:, None, None, :]
    return scores / scores.sum(-1, keepdim=True).clamp_min(_EPS)


def naive_linear_attention(fq, fk, v, *, causal: bool, key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """The masked quadratic form (phi(q) phi(k)^T * M) v / rowsum: reference for the O(n) forms."""
    weights = linear_attention_weights(fq.double(), fk.double(), causal=causal, key_valid=key_valid)
    return weights @ v.repeat_interleave(fq.shape[1] // fk.shape[1], dim=1).double()
