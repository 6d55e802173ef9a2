"""Low-rank latents of keys and values (the math of `mla`), with no model knowledge.

Keys are rotated by RoPE before they are cached. RoPE (rotate_half layout) turns dims f and
f + D/2 of every head by the same angle: read as one complex number z_f = k_f + i k_{f+D/2} per head,
a position multiplies z_f of all heads by e^{i p theta_f}. A latent that mixes heads *within* one
frequency with complex weights, c_f = Down_f z_f, is therefore rotated the same way, and the rotated
keys are rebuilt from the rotated latent, Up_f c_f, without knowing positions. So the cache holds
the latent of keys after RoPE, and at full rank rebuilding is exact. The start is the complex SVD
of each frequency's (heads x inputs) projection; the rank goes to the largest singular values over
all frequencies. Values are not rotated: their latent is the top of the SVD of the value projection.

Weighted start (`init="attention"`): what matters is not the keys and values themselves but the
logits q.k and the output W_o v. With queries independent of keys, the logit error of key head h at
frequency f is weighted by E|q_f|^2 summed over the query heads that read h (`query_energy`), and the
output error of a value is weighted by W_o^T W_o of the query heads that read it (`output_metric`).
The principal components are then taken of the weighted keys and values (W^1/2 z), and the factors
undo the weight (down = U^H W^1/2, up = W^-1/2 U); at full rank this is still exact.
"""

from __future__ import annotations

import torch


def _augmented(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """weight with the bias as one more input column (a constant input of 1), in float64."""
    w = weight.detach().double()
    return torch.cat([w, w.new_zeros(w.shape[0], 1) if bias is None else bias.detach().double()[:, None]], dim=1)


def _inputs(covariance: torch.Tensor | None, size: int) -> torch.Tensor:
    """E[x x^T] of the augmented inputs [x, 1]; the identity when nothing was measured (then the
    factors are the plain SVD of the weights)."""
    return torch.eye(size, dtype=torch.float64) if covariance is None else covariance.double()


def _per_frequency(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """(heads*D x inputs) real -> (F, heads, inputs) complex: row f + i row f+D/2 of every head."""
    per_head = weight.reshape(heads, 2, weight.shape[0] // heads // 2, -1)
    return torch.complex(per_head[:, 0], per_head[:, 1]).transpose(0, 1)


def query_energy(weight, bias, heads: int, kv_heads: int, covariance: torch.Tensor | None = None) -> torch.Tensor:
    """(F, kv_heads): E|q_f|^2 of a query projection (heads*D x inputs), summed over the query heads
    that read each kv head (GQA groups are consecutive)."""
    w = _augmented(weight, bias)
    m = _per_frequency(w, heads)
    sigma = _inputs(covariance, w.shape[1]).to(m.dtype)
    energy = torch.einsum("fhi,ij,fhj->fh", m.conj(), sigma, m).real
    return energy.reshape(energy.shape[0], kv_heads, heads // kv_heads).sum(-1)


def output_metric(weight: torch.Tensor, heads: int, kv_heads: int) -> torch.Tensor:
    """(kv_heads*D square, block diagonal): sum of W_o_j^T W_o_j over the query heads j that read
    each kv head, W_o_j the output projection's columns of head j."""
    w = weight.detach().double()
    d = w.shape[1] // heads
    per_query = w.reshape(w.shape[0], heads, d)
    grams = torch.einsum("ohd,ohe->hde", per_query, per_query).reshape(kv_heads, heads // kv_heads, d, d).sum(1)
    return torch.block_diag(*grams)


def _sqrt_and_inverse(metric: torch.Tensor):
    """Symmetric square root of a PSD matrix and its inverse, eigenvalues floored at 1e-6 of the
    largest so a direction no query reads stays invertible."""
    energy, basis = torch.linalg.eigh(metric)
    energy = energy.clamp_min(energy.max() * 1e-6)
    return (basis * energy.sqrt()) @ basis.T, (basis / energy.sqrt()) @ basis.T


def key_factors(weight, bias, heads: int, pairs: int, full_rank_pairs: int, covariance: torch.Tensor | None = None,
                weights: torch.Tensor | None = None):
    """The start of the key latent from a key projection (heads*D x inputs).

    The slots of frequency f are the eigenvectors of its keys' (heads x heads) complex covariance
    M_f E[x x^T] M_f^H, where M_f holds row f + i row f+D/2 of every head (with measured inputs:
    the keys' principal components; without: the projection's SVD). Returns down, up
    (2, F, heads, heads): real and imaginary parts of Down_f (slot x head) and Up_f (head x slot),
    and slots (F, heads) bool: the `pairs` kept, the first `full_rank_pairs` frequencies (RoPE's
    fastest) whole, the rest by eigenvalue over all frequencies. `weights` (F, heads) > 0 weigh
    each key coordinate's error (`query_energy`): components and the ranking are then of logit error."""
    w = _augmented(weight, bias)
    half = w.shape[0] // heads // 2
    m = _per_frequency(w, heads)  # (F, heads, inputs)
    root = torch.ones(half, heads, dtype=torch.float64) if weights is None else weights.double().sqrt()
    root = root.clamp_min(root.max() * 1e-3)
    m = m * root[..., None]
    sigma = _inputs(covariance, w.shape[1]).to(m.dtype)
    energy, u = torch.linalg.eigh(m @ sigma @ m.conj().transpose(1, 2))  # ascending
    energy, u = energy.flip(-1), u.flip(-1)
    priority = energy.clone()
    priority[:full_rank_pairs] = float("inf")
    order = priority.flatten().argsort(descending=True, stable=True)[:pairs]
    slots = torch.zeros(half * heads, dtype=torch.bool)
    slots[order] = True
    down = u.conj().transpose(1, 2) * root[:, None, :]
    u = u / root[..., None]
    return (torch.stack([down.real, down.imag]).float(), torch.stack([u.real, u.imag]).float(),
            slots.reshape(half, heads))


def value_factors(weight, bias, rank: int, covariance: torch.Tensor | None = None, metric: torch.Tensor | None = None):
    """down (rank x heads*D), up (heads*D x rank): the top-`rank` eigenvectors of the values'
    covariance W E[x x^T] W^T (without measured inputs: the left singular vectors of W); with
    `metric` (`output_metric`) those of the weighted values M^1/2 v, unweighted again in the factors."""
    w = _augmented(weight, bias)
    if metric is None:
        root = inverse = torch.eye(w.shape[0], dtype=torch.float64)
    else:
        root, inverse = _sqrt_and_inverse(metric.double())
    w = root @ w
    _, u = torch.linalg.eigh(w @ _inputs(covariance, w.shape[1]) @ w.T)
    top = u.flip(-1)[:, :rank]
    return (top.T @ root).float().contiguous(), (inverse @ top).float().contiguous()


def _complex_mix(weights: torch.Tensor, real: torch.Tensor, imag: torch.Tensor, pattern: str):
    a, b = weights[0].to(real.dtype), weights[1].to(real.dtype)
    return (torch.einsum(pattern, a, real) - torch.einsum(pattern, b, imag),
            torch.einsum(pattern, a, imag) + torch.einsum(pattern, b, real))


def compress_keys(keys: torch.Tensor, down: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """(B, heads, L, D) rotated keys -> (B, 1, L, 2 * kept slots) rotated latent."""
    half = keys.shape[-1] // 2
    real, imag = _complex_mix(down, keys[..., :half], keys[..., half:], "fsh,bhlf->blfs")
    keep = slots.flatten().nonzero().squeeze(-1)
    flat = lambda t: t.flatten(2).index_select(-1, keep)  # noqa: E731
    return torch.cat([flat(real), flat(imag)], dim=-1).unsqueeze(1)


def expand_keys(latent: torch.Tensor, up: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """The inverse of `compress_keys`: (B, 1, L, 2n) -> (B, heads, L, D)."""
    half, heads = slots.shape
    keep = slots.flatten().nonzero().squeeze(-1)
    b, _, length, _ = latent.shape
    parts = []
    for part in latent[:, 0].chunk(2, dim=-1):
        full = latent.new_zeros(b, length, half * heads)
        full[..., keep] = part
        parts.append(full.reshape(b, length, half, heads))
    real, imag = _complex_mix(up, *parts, "fhs,blfs->bhlf")
    return torch.cat([real, imag], dim=-1)


def compress_values(values: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """(B, heads, L, D) -> (B, 1, L, rank)."""
    return (values.transpose(1, 2).flatten(2) @ down.to(values.dtype).T).unsqueeze(1)


def expand_values(latent: torch.Tensor, up: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, 1, L, rank) -> (B, heads, L, D)."""
    flat = latent[:, 0] @ up.to(latent.dtype).T
    return flat.unflatten(-1, (heads, -1)).transpose(1, 2)


# --- keys before RoPE (`mla` keys="pre_rope"): any mixing of dims, RoPE applied again when rebuilt

def apply_rope(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """RoPE's rotate_half rotation of (B, H, L, D) keys by (B, L, D) cos/sin; `inverse` undoes it."""
    cos, sin = cos[:, None].to(keys.dtype), sin[:, None].to(keys.dtype)
    first, second = keys.chunk(2, dim=-1)
    turned = torch.cat([-second, first], dim=-1)
    return keys * cos - turned * sin if inverse else keys * cos + turned * sin


POSITION_COLUMNS = 3  # base-256 digits: exact in bf16/fp16 (integers to 256 are), positions below 2^24


def position_columns(positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) integer positions -> (B, 1, L, POSITION_COLUMNS) of `dtype`, stored beside the latent."""
    positions = positions.long()
    if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= 256 ** POSITION_COLUMNS):
        raise ValueError(f"positions must lie in [0, {256 ** POSITION_COLUMNS}) to be cached beside the latent")
    digits = [(positions // 256 ** i) % 256 for i in range(POSITION_COLUMNS)]
    return torch.stack(digits, dim=-1).unsqueeze(1).to(dtype)


def positions_from_columns(columns: torch.Tensor) -> torch.Tensor:
    """The inverse of `position_columns`: (B, 1, L, POSITION_COLUMNS) -> (B, L) long."""
    digits = columns[:, 0].round().long()
    return sum(digits[..., i] * 256 ** i for i in range(POSITION_COLUMNS))
