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

from .segments import RECYCLED_SEGMENT_BYTES, segment_bytes

_EPS = 1e-12


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
    """Learnable Hedgehog map, per head: phi(x) = [softmax(x W + b), softmax(-(x W + b))]; W starts
    as the identity and b at zero, so training starts from a well-defined map."""

    def __init__(self, num_heads: int, head_dim: int, dtype=None, device=None):
        super().__init__()
        eye = torch.eye(head_dim, dtype=dtype, device=device)
        self.weight = nn.Parameter(eye.expand(num_heads, head_dim, head_dim).clone())
        self.bias = nn.Parameter(torch.zeros(num_heads, 1, head_dim, dtype=dtype, device=device))

    def feature_dim(self, head_dim: int) -> int:
        return 2 * head_dim

    def forward(self, x, is_query):
        # batched matmuls over heads (einsum's is ~2x slower on CPU); both softmaxes in one call over
        # (..., 2, D), which flattens to [softmax(p), softmax(-p)]. A decoding step: fewest kernels;
        # training: out of place, as autograd keeps the softmax's output
        if x.shape[-2] == 1 or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
            projected = torch.matmul(x, self.weight.to(x.dtype)).add_(self.bias.to(x.dtype))
            return torch.softmax(torch.stack((projected, -projected), dim=-2), dim=-1).flatten(-2)
        # a prefill without autograd: [p, -p] from one matmul with [W, -W], the softmax in place, so no
        # further (tokens x 2D) buffer is allocated (q's features at 16k tokens: 104 -> 66 ms)
        weight = torch.cat([self.weight, -self.weight], dim=-1).to(x.dtype)
        bias = torch.cat([self.bias, -self.bias], dim=-1).to(x.dtype)
        logits = torch.matmul(x, weight).add_(bias).unflatten(-1, (2, -1))
        logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()
        return logits.div_(logits.sum(dim=-1, keepdim=True)).flatten(-2)


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


def exclusive_prefix_sum(chunk_states: torch.Tensor, initial: torch.Tensor, needs_grad: bool) -> torch.Tensor:
    """State before each chunk along dim 2: `initial` plus the chunks before it. On the CPU without
    autograd a loop of adds into one buffer (torch's cumsum over a middle dim is ~5x slower there); on
    an accelerator one cumsum (the loop was ~30k kernel launches per 32k-token lolcats prefill)."""
    if needs_grad or chunk_states.device.type != "cpu":
        return chunk_states.cumsum(dim=2) - chunk_states + initial[:, :, None]
    prefix = torch.empty_like(chunk_states)
    prefix[:, :, 0] = initial
    for j in range(1, chunk_states.shape[2]):
        torch.add(prefix[:, :, j - 1], chunk_states[:, :, j - 1], out=prefix[:, :, j])
    return prefix


def bidirectional_linear_attention(fq, fk, v, key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Every query sees every valid key. key_valid: (B, Lk) bool or None."""
    if key_valid is not None:
        fk = fk * key_valid[:, None, :, None].to(fk.dtype)
    state = accumulate_state(zero_state(fk, v), fk, v)
    grouped = _group_queries(fq.float(), fk.shape[1])  # (B, Hkv, G, Lq, F)
    num = grouped @ state.kv[:, :, None]
    den = grouped @ state.k_sum[:, :, None, :, None]
    return _ungroup(num / den.clamp_min(_EPS)).to(v.dtype)


def causal_linear_attention(fq: torch.Tensor, fk: torch.Tensor, v: torch.Tensor, *, state: LinearState | None = None,
                            key_valid: torch.Tensor | None = None,
                            chunk_size: int = 64) -> tuple[torch.Tensor, LinearState]:
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
    # the largest per-segment intermediates are (B, Hq, segment, max(chunk, F, Dv)) floats
    per_token_bytes = batch * kv_heads * groups * max(chunk, f, dv) * 4
    segment = max(1, segment_bytes(fq.device, RECYCLED_SEGMENT_BYTES) // (per_token_bytes * chunk)) * chunk
    out = fq.new_empty(batch, lq, kv_heads, groups, dv)  # written in the (B, L, H, D) layout the model wants
    full = lq - lq % chunk
    for start in range(0, full, segment):
        stop = min(full, start + segment)
        state = _causal_chunks(fq[:, :, start:stop], fk[:, :, start:stop], v[:, :, start:stop], state, chunk,
                               out[:, start:stop])
    if full < lq:  # the last, shorter chunk
        state = _causal_chunks(fq[:, :, full:], fk[:, :, full:], v[:, :, full:], state, lq - full, out[:, full:])
    return out.view(batch, lq, kv_heads * groups, dv).transpose(1, 2).to(out_dtype), state


def _causal_chunks(fq, fk, v, state: LinearState, chunk: int, out: torch.Tensor) -> LinearState:
    """Chunks of `chunk` tokens (their count divides the length): quadratic attention within each chunk
    plus the state of everything before it. Writes `out` (B, L, Hkv, G, Dv); returns the state after.

    A kv head's G query heads of one chunk are stacked into one (G * C, F) matrix, so every product
    is one batched matmul over (batch, kv head, chunk). In-place ops only touch matmul and cumsum
    outputs, which autograd does not keep (training through this path stays exact)."""
    batch, kv_heads, length, f = fk.shape
    groups, dv, n_chunks = fq.shape[1] // kv_heads, v.shape[-1], length // chunk
    items = batch * kv_heads * n_chunks
    q_c = fq.reshape(batch, kv_heads, groups, n_chunks, chunk, f).transpose(2, 3).reshape(items, groups * chunk, f)
    k_c, v_c = fk.reshape(items, chunk, f), v.reshape(items, chunk, dv)

    chunk_kv = torch.bmm(k_c.transpose(1, 2), v_c).view(batch, kv_heads, n_chunks, f, dv)
    chunk_ksum = k_c.sum(dim=1).view(batch, kv_heads, n_chunks, f)
    # state before each chunk: the running sums of the chunks before it, plus the incoming state
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (fq, fk, v, state.kv))
    prefix_kv = exclusive_prefix_sum(chunk_kv, state.kv, needs_grad).view(items, f, dv)
    prefix_ksum = exclusive_prefix_sum(chunk_ksum, state.k_sum, needs_grad).view(items, f, 1)

    scores = torch.bmm(q_c, k_c.transpose(1, 2))  # (items, G * C, C)
    scores.view(items, groups, chunk, chunk).tril_()
    num = torch.bmm(q_c, prefix_kv).baddbmm_(scores, v_c)
    den = torch.bmm(q_c, prefix_ksum).add_(scores.sum(dim=-1, keepdim=True))
    result = (num / den.clamp_min(_EPS)).view(batch, kv_heads, n_chunks, groups, chunk, dv)
    out.view(batch, n_chunks, chunk, kv_heads, groups, dv).copy_(result.permute(0, 2, 4, 1, 3, 5))
    return LinearState(kv=state.kv + chunk_kv.sum(dim=2), k_sum=state.k_sum + chunk_ksum.sum(dim=2))


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
