"""Causal linear attention through flash-linear-attention's chunked Triton kernel (the optional
`fla` extra): the same contract as `linear.causal_linear_attention` for a prefill whose queries are
its keys, continuing from a `LinearState`.

The kernel `fla.ops.linear_attn.chunk_linear_attn` (flash-linear-attention >= 0.6) takes
(B, T, H, F) features and (B, T, H, Dv) values with as many key heads as query heads, returns
o_t = phi(q_t)(S_0 + sum_{j<=t} phi(k_j) v_j^T) / phi(q_t)(z_0 + sum_{j<=t} phi(k_j)) with
`scale=1` (our feature maps already hold the scaling) and `normalize=True`, and carries the
state as (S, z) with z shaped (B, 1, H, F). Triton kernels need a GPU: on other devices the
caller stays on the torch path (`fla_unusable_reason` says why).
"""

from __future__ import annotations

import functools

import torch

from .linear import LinearState, zero_state
from .reference import repeat_kv

# flash-linear-attention tiles the feature dim into blocks of at most this many; wider maps
# (taylor: 1 + d + d(d+1)/2 features) stay on the torch path
FLA_MAX_FEATURES = 256
# the kernel reads (B, T, H, F) and refuses T < H (it takes that for a head-first layout); below one
# of its chunks there is nothing to gain anyway
FLA_MIN_TOKENS = 64


@functools.cache
def fla_kernel():
    """flash-linear-attention's chunked linear attention, or None when it cannot be imported."""
    try:
        from fla.ops.linear_attn import chunk_linear_attn
    except Exception:  # not installed, or Triton missing / broken: either way the torch path runs
        return None
    return chunk_linear_attn


def fla_unusable_reason(fq: torch.Tensor) -> str | None:
    """Why the fla kernel cannot run for these query features at all (None when it can)."""
    if not fq.is_cuda:  # checked first: off a GPU fla is never imported
        return f"its Triton kernels run on CUDA tensors and this call's are on {fq.device.type}"
    if fla_kernel() is None:
        return "flash-linear-attention is not importable (pip install 'attnpatch[fla]' on a machine with a GPU)"
    if fq.shape[-1] > FLA_MAX_FEATURES:
        return f"the feature map has {fq.shape[-1]} features per head; the kernel takes at most {FLA_MAX_FEATURES}"
    return None


def fla_worth_it(lq: int, lk: int, query_heads: int) -> bool:
    """A prefill whose queries are its keys, at least one of the kernel's chunks long (shorter
    calls, decoding steps and continuations run the torch path, whatever the backend)."""
    return lq == lk and lq >= max(FLA_MIN_TOKENS, query_heads)


def fla_causal_linear_attention(fq, fk, v, *, state: LinearState | None = None,
                                key_valid: torch.Tensor | None = None, kernel=None) -> tuple[torch.Tensor, LinearState]:
    """causal_linear_attention on the fla kernel, queries = keys. fq (B, Hq, L, F), fk (B, Hkv, L, F),
    v (B, Hkv, L, Dv); returns the output (B, Hq, L, Dv) (a view of the (B, L, Hq, Dv) layout the model
    wants) and the state after all keys, per kv head, float32. `kernel` replaces fla's (tests)."""
    kernel = kernel or fla_kernel()
    out_dtype = v.dtype
    b, hq, length, f = fq.shape
    hkv, dv = fk.shape[1], v.shape[-1]
    groups = hq // hkv
    fk = fk.float() if key_valid is None else fk.float() * key_valid[:, None, :, None]
    if state is None:
        state = zero_state(fk, v)
    # float32 throughout, like the torch path: a bf16 normaliser loses the older keys' mass
    q_t = fq.float().transpose(1, 2).contiguous()
    k_t, v_t = (repeat_kv(t, groups).transpose(1, 2).contiguous() for t in (fk, v.float()))
    kv0 = repeat_kv(state.kv, groups).contiguous()
    z0 = repeat_kv(state.k_sum[:, :, None], groups).transpose(1, 2).contiguous()  # (B, 1, Hq, F)
    out, (kv, z) = kernel(q_t, k_t, v_t, scale=1.0, initial_state=(kv0, z0), output_final_state=True,
                          normalize=True)
    # every query head of a group holds the same state: keep one per kv head
    after = LinearState(kv=kv.float().view(b, hkv, groups, f, dv)[:, :, 0].contiguous(),
                        k_sum=z.float().view(b, hkv, groups, f)[:, :, 0].contiguous())
    return out.transpose(1, 2).to(out_dtype), after
