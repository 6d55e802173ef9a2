"""Window + linear hybrid attention (LoLCATs): exact softmax over the `window` nearest keys, linear
attention over every other visible key, in one normalisation with a per-head mix g in (0, 1):

    out_i = (g * sum_{j in W_i} e_ij v_j + (1 - g) * sum_{j in L_i} phi(q_i).phi(k_j) v_j)
          / (g * sum_{j in W_i} e_ij     + (1 - g) * sum_{j in L_i} phi(q_i).phi(k_j))

with e_ij = exp(q_i.k_j * scaling - m_i), m_i the largest windowed score of query i.
Causal: W_i = {i-window < j <= i}, L_i = {j <= i-window}. Bidirectional: W_i = {|i-j| < window},
L_i = the other valid keys. Shapes and GQA conventions as in linear.py; `gate` is (Hq,) in (0, 1).
"""

from __future__ import annotations

import torch

from .linear import LinearState, accumulate_state, exclusive_prefix_sum, zero_state
from .segments import RECYCLED_SEGMENT_BYTES, segment_bytes
from .reference import repeat_kv


def _window_scores(q_blk, k_blk, scaling, allowed, softcap=None):
    """exp(scores - rowmax) over allowed entries (0 elsewhere)."""
    scores = torch.matmul(q_blk, k_blk.transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~allowed, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True).clamp_min(-1e30)
    weights = torch.exp(scores - row_max).masked_fill(~allowed, 0.0)
    return weights


def hybrid_attention(query, key, value, fq, fk, gate, *, window: int, scaling: float, causal: bool = True,
                     key_valid: torch.Tensor | None = None, state: LinearState | None = None,
                     block_size: int = 64, softcap: float | None = None) -> tuple[torch.Tensor, LinearState | None]:
    """Chunked hybrid attention. Causal: O(L * (window + block)); keys older than the given K/V may
    already be summed into `state` (they are all outside every window). Returns the output
    (B, Hq, Lq, D) and, when causal, the linear state of every key except the last window - 1
    (what a decoding cache must carry over as a state)."""
    groups = query.shape[1] // key.shape[1]
    lq, lk = query.shape[-2], key.shape[-2]
    if causal and lq == 1 and lk <= window:
        return hybrid_decoding_step(query, key, value, fq, fk, torch.logit(gate.float()), window=window,
                                    scaling=scaling, key_valid=key_valid, state=state, softcap=softcap)
    if causal and lq == lk and lq > 1:
        return _causal_prefill(query, key, value, fq, fk, gate, window, scaling, key_valid, state, block_size, softcap)
    out_dtype = value.dtype
    q, k, v = query.float(), repeat_kv(key, groups).float(), repeat_kv(value, groups).float()
    fq, fk_g = fq.float(), repeat_kv(fk, groups).float()
    valid = torch.ones(k.shape[0], lk, dtype=torch.bool, device=k.device) if key_valid is None else key_valid
    fk_g = fk_g * valid[:, None, :, None]
    g = gate.float().reshape(1, -1, 1, 1)
    key_pos = torch.arange(lk, device=q.device)

    if not causal:  # float64: "all keys minus the window" must not cancel away the linear part
        fk64 = fk_g.double()
        total = LinearState(kv=fk64.transpose(-1, -2) @ v.double(), k_sum=fk64.sum(dim=-2))
    prefix = state if state is not None else zero_state(fk_g[:, ::groups], v[:, ::groups])
    # running state of the linear part, per kv head (expanded to query heads when used);
    # `folded` counts the given keys already summed into it
    outputs, folded = [], 0
    for start in range(0, lq, block_size):
        stop = min(lq, start + block_size)
        q_pos = torch.arange(start, stop, device=q.device) + (lk - lq if causal else 0)
        lo = max(0, int(q_pos[0]) - window + 1)
        hi = int(q_pos[-1]) + 1 if causal else min(lk, int(q_pos[-1]) + window)
        dist = q_pos[:, None] - key_pos[None, lo:hi]
        in_window = (dist >= 0) & (dist < window) if causal else dist.abs() < window
        allowed = in_window[None, None] & valid[:, None, None, lo:hi]
        q_blk, fq_blk = q[..., start:stop, :], fq[..., start:stop, :]
        e = _window_scores(q_blk, k[..., lo:hi, :], scaling, allowed, softcap)
        num = g * (e @ v[..., lo:hi, :])
        den = g * e.sum(-1, keepdim=True)
        lin = fq_blk @ fk_g[..., lo:hi, :].transpose(-1, -2)  # linear weights on the same key range
        if causal:
            # keys before lo are outside every window of this block: fold the ones the previous
            # block had not yet folded into the running state (each key is folded once: O(n))
            if lo > folded:
                prefix = accumulate_state(prefix, fk_g[:, ::groups, folded:lo], v[:, ::groups, folded:lo])
                folded = lo
            before = prefix
            kv, ks = repeat_kv(before.kv, groups), repeat_kv(before.k_sum[..., None], groups)[..., 0]
            outside = (dist >= window)[None, None] & valid[:, None, None, lo:hi]  # older than the window
            lin_num = fq_blk @ kv + (lin * outside) @ v[..., lo:hi, :]
            lin_den = (fq_blk @ ks[..., None]) + (lin * outside).sum(-1, keepdim=True)
        else:
            fq64, lin64 = fq_blk.double(), (fq_blk.double() @ fk_g[..., lo:hi, :].double().transpose(-1, -2)) * allowed
            lin_num = (fq64 @ total.kv.double() - lin64 @ v[..., lo:hi, :].double()).float()
            lin_den = (fq64 @ total.k_sum.double()[..., None] - lin64.sum(-1, keepdim=True)).float()
        num = num + (1 - g) * lin_num
        den = den + (1 - g) * lin_den
        outputs.append(num / den.clamp_min(1e-30))
    out = torch.cat(outputs, dim=-2).to(out_dtype)
    if not causal:
        return out, None
    carried = max(0, lk - (window - 1))  # keys that leave the window for good
    if carried > folded:
        prefix = accumulate_state(prefix, fk_g[:, ::groups, folded:carried], v[:, ::groups, folded:carried])
    return out, prefix


def _causal_prefill(query, key, value, fq, fk, gate, window, scaling, key_valid, state, chunk, softcap):
    """hybrid_attention when the queries are the keys (a prefill), all chunks at once: a chunk's
    queries see the keys of their own chunk and of the `reach` chunks before it (the window's
    span) with the window / linear / future split fixed by position, and everything older through
    the running linear state, an exclusive prefix sum of chunk states. Segments of chunks bound
    the memory; the output is written in the (B, L, H, D) layout the model wants.

    Passes over the (queries x span) weights are what cost here. Dividing numerator and normaliser
    by (1 - g) leaves the window weights scaled by g / (1 - g), which the exponent absorbs
    (exp(s - m + logit g)); the window mask rides on the score matmul; phi(q).phi(k) is computed
    only on the span columns that can be older than the window."""
    b, hq, length, d = query.shape
    hkv, dv, f = key.shape[1], value.shape[-1], fq.shape[-1]
    groups = hq // hkv
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value, fq, fk, gate))
    reach = -(-(window - 1) // chunk)  # earlier chunks a window can reach into
    span = (reach + 1) * chunk
    n_chunks = -(-length // chunk)
    tail = n_chunks * chunk - length  # keys/queries padded at the end: every real query sees them as future
    front = reach * chunk  # zero keys before position 0, so every chunk has `reach` chunks before it
    q, k, fq, fk = query.float(), key.float(), fq.float(), fk.float()
    if key_valid is not None:
        fk = fk * key_valid[:, None, :, None]
    values = value.float()
    k, values, fk = (torch.nn.functional.pad(t, (0, 0, front, tail)) for t in (k, values, fk))
    if tail:
        q, fq = (torch.nn.functional.pad(t, (0, 0, 0, tail)) for t in (q, fq))
    # position split of query t (chunk offset) against key u of the chunk's span: distance front + t - u
    distance = front + torch.arange(chunk, device=q.device)[:, None] - torch.arange(span, device=q.device)[None, :]
    window_bias = torch.zeros(chunk, span, device=q.device).masked_fill_((distance < 0) | (distance >= window),
                                                                         float("-inf"))
    lin_width = max(0, front + chunk - window)  # span columns that hold keys older than some query's window
    older = (distance[:, :lin_width] >= window).float()
    key_bias = None
    if key_valid is not None or front:  # keys before position 0 (front padding) and padding keys are never seen
        valid = torch.ones(b, length, dtype=torch.bool, device=q.device) if key_valid is None else key_valid
        valid = torch.nn.functional.pad(valid, (front, tail))
        key_bias = torch.zeros(valid.shape, device=q.device).masked_fill_(~valid, float("-inf"))
    gate = gate.float().reshape(1, hkv, 1, groups, 1, 1)
    window_logit = torch.log(gate) - torch.log1p(-gate)  # log(g / (1 - g))
    running = state if state is not None else zero_state(fk, values)
    carried_end = front + max(0, length - (window - 1))  # padded position of the first key still in a window
    carried_chunk, carried_state = carried_end // chunk, None
    out = q.new_empty(b, n_chunks * chunk, hkv, groups, dv)
    step = max(1, segment_bytes(q.device, RECYCLED_SEGMENT_BYTES) // (b * hq * chunk * max(span, f, dv) * 4))
    for c0 in range(0, n_chunks, step):
        c1 = min(n_chunks, c0 + step)
        n, items = c1 - c0, b * hkv * (c1 - c0)
        shape = (b, hkv, n, groups, chunk, span)
        lo, hi = c0 * chunk, c1 * chunk + front  # the padded positions the segment's spans cover
        k_s, v_s, fk_s = (t[:, :, lo:hi].unfold(2, span, chunk).transpose(-1, -2).reshape(items, span, t.shape[-1])
                          for t in (k, values, fk))
        q_s, fq_s = (t[:, :, lo:lo + n * chunk].reshape(b, hkv, groups, n, chunk, t.shape[-1]).transpose(2, 3)
                     for t in (q, fq))
        q_s, fq_s = q_s.reshape(items, groups * chunk, d), fq_s.reshape(items, groups * chunk, f)
        if softcap is None:
            scores = torch.baddbmm(window_bias.repeat(groups, 1), q_s, k_s.transpose(1, 2), alpha=scaling).view(shape)
        else:
            scores = torch.bmm(q_s, k_s.transpose(1, 2)) * scaling
            scores = (torch.tanh(scores / softcap) * softcap).view(shape) + window_bias
        if key_bias is not None:
            bias = key_bias[:, lo:hi].unfold(1, span, chunk)[:, None, :, None, None, :]  # (B, 1, n, 1, 1, span)
            scores = scores + bias if needs_grad else scores.add_(bias)
        shift = scores.amax(dim=-1, keepdim=True).clamp_min(-1e30) - window_logit  # rows without keys stay finite
        mixed = (scores - shift if needs_grad else scores.sub_(shift)).exp_()  # e g / (1 - g), 0 outside the window
        if lin_width:
            lin = torch.bmm(fq_s, fk_s[:, :lin_width].transpose(1, 2)).view(*shape[:-1], lin_width)  # 0 for padding
            if needs_grad:
                mixed = torch.cat([torch.addcmul(mixed[..., :lin_width], lin, older), mixed[..., lin_width:]], dim=-1)
            else:
                mixed[..., :lin_width].addcmul_(lin, older)
        # the state before each chunk's span (the padded chunks before it): an exclusive prefix sum
        chunk_fk = fk[:, :, lo:lo + n * chunk].reshape(items, chunk, f)
        chunk_kv = torch.bmm(chunk_fk.transpose(1, 2), values[:, :, lo:lo + n * chunk].reshape(items, chunk, dv))
        chunk_kv = chunk_kv.view(b, hkv, n, f, dv)
        chunk_ksum = chunk_fk.sum(dim=1).view(b, hkv, n, f)
        prefix_kv = exclusive_prefix_sum(chunk_kv, running.kv, needs_grad)
        prefix_ksum = exclusive_prefix_sum(chunk_ksum, running.k_sum, needs_grad)
        if c0 <= carried_chunk < c1:
            carried_state = LinearState(kv=prefix_kv[:, :, carried_chunk - c0].clone(),
                                        k_sum=prefix_ksum[:, :, carried_chunk - c0].clone())
        mixed = mixed.view(items, groups * chunk, span)
        num = torch.bmm(fq_s, prefix_kv.view(items, f, dv)).baddbmm_(mixed, v_s)
        den = torch.bmm(fq_s, prefix_ksum.view(items, f, 1)).add_(mixed.sum(dim=-1, keepdim=True))
        result = (num / den.clamp_min(1e-30)).view(b, hkv, n, groups, chunk, dv)
        out[:, c0 * chunk : c1 * chunk].view(b, n, chunk, hkv, groups, dv).copy_(result.permute(0, 2, 4, 1, 3, 5))
        running = LinearState(kv=running.kv + chunk_kv.sum(dim=2), k_sum=running.k_sum + chunk_ksum.sum(dim=2))
    if carried_chunk >= n_chunks:  # beyond the last chunk only zero padding remains before carried_end
        carried_state, carried_chunk = running, min(carried_chunk, n_chunks)
    # the cache carries every key but the last window - 1: the chunks before `carried_chunk`, then the rest
    rest = slice(carried_chunk * chunk, carried_end)
    carried_state = accumulate_state(carried_state, fk[:, :, rest], values[:, :, rest])
    result = out[:, :length].reshape(b, length, hq, dv).transpose(1, 2)
    return result.to(value.dtype), carried_state


def hybrid_decoding_step(query, key, value, fq, fk, gate_logit, *, window: int, scaling: float,
                         key_valid: torch.Tensor | None = None, state: LinearState | None = None,
                         softcap: float | None = None) -> tuple[torch.Tensor, LinearState]:
    """hybrid_attention for one new token whose keys all lie in its window (a decoding step), the
    gate given as its logit: each kv head's query group folded into the query dim (no repeated
    K/V), the state read as it is, then the keys leaving the window folded in. `fk` may hold only
    the features of the keys that leave (the first lk - (window - 1)): the others need none.

    A step's tensors are tiny, so its cost is its number of kernels: numerator and normaliser are
    divided by (1 - g), which puts logit(g) into the window's exponent (as in the prefill); each
    product is one batched matmul, the state's read accumulated onto the window's; without padding
    every row holds its own token, so nothing is masked or clamped."""
    b, hq, _, d = query.shape
    hkv, lk, dv, f = key.shape[1], key.shape[-2], value.shape[-1], fq.shape[-1]
    groups, items = hq // hkv, b * hkv
    leaving = max(0, lk - (window - 1))
    k, v = key.float().reshape(items, lk, d), value.float().reshape(items, lk, dv)
    q = query.float().reshape(items, groups, d)
    if softcap is None:
        scores = torch.baddbmm(q.new_empty(()), q, k.transpose(1, 2), beta=0, alpha=scaling)
    else:
        scores = torch.tanh(torch.bmm(q, k.transpose(1, 2)) * (scaling / softcap)) * softcap
    scores = scores.view(b, hkv, groups, lk)
    # in place only where autograd keeps nothing (a step is usually decoding, without gradients)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value, fq, fk, gate_logit))
    if key_valid is None:
        shift = scores.amax(dim=-1, keepdim=True)
    else:
        hidden = ~key_valid[:, None, None, :]
        scores = scores.masked_fill(hidden, float("-inf")) if needs_grad else scores.masked_fill_(hidden, float("-inf"))
        shift = scores.amax(dim=-1, keepdim=True).clamp_min(-1e30)  # rows without keys stay finite
    shift = shift - gate_logit.float().view(1, hkv, groups, 1)
    mixed = (scores - shift).exp() if needs_grad else scores.sub_(shift).exp_()
    mixed = mixed.view(items, groups, lk)  # e * g / (1 - g)
    prefix = state if state is not None else zero_state(fq[:, :hkv], v.view(b, hkv, lk, dv))
    fq = fq.float().reshape(items, groups, f)
    num = torch.baddbmm(torch.bmm(mixed, v), fq, prefix.kv.reshape(items, f, dv))
    den = torch.baddbmm(mixed.sum(dim=-1, keepdim=True), fq, prefix.k_sum.reshape(items, f, 1))
    if key_valid is not None:
        den.clamp_min_(1e-30)
    out = num.div_(den).view(b, hq, 1, dv).to(value.dtype)
    if leaving > 0:  # keys that leave the window for good
        fk = fk[:, :, :leaving].float()
        if key_valid is not None:
            fk = fk * key_valid[:, None, :leaving, None]
        fk_t = fk.reshape(items, leaving, f).transpose(1, 2)
        kv = torch.baddbmm(prefix.kv.reshape(items, f, dv), fk_t, v[:, :leaving]).view(b, hkv, f, dv)
        k_sum = prefix.k_sum + (fk[:, :, 0] if leaving == 1 else fk.sum(dim=-2))
        prefix = LinearState(kv=kv, k_sum=k_sum)
    return out, prefix


def hybrid_attention_weights(query, key, fq, fk, gate, *, window: int, scaling: float, causal: bool = True,
                             key_valid: torch.Tensor | None = None, softcap: float | None = None) -> torch.Tensor:
    """The (B, Hq, Lq, Lk) weights of the quadratic definition (module docstring), rows summing to 1,
    in the inputs' dtype; differentiable, so attention transfer can match them to softmax weights."""
    groups = query.shape[1] // key.shape[1]
    k, fk = repeat_kv(key, groups), repeat_kv(fk, groups)
    lq, lk = query.shape[-2], k.shape[-2]
    device = query.device
    q_pos = torch.arange(lk - lq, lk, device=device) if causal else torch.arange(lq, device=device)
    dist = q_pos[:, None] - torch.arange(lk, device=device)[None, :]
    valid = torch.ones(k.shape[0], lk, dtype=torch.bool, device=device) if key_valid is None else key_valid
    visible = ((dist >= 0) if causal else torch.ones_like(dist, dtype=torch.bool))[None, None] & valid[:, None, None]
    in_window = ((dist < window) if causal else (dist.abs() < window))[None, None] & visible
    e = _window_scores(query, k, scaling, in_window, softcap)
    lin = (fq @ fk.transpose(-1, -2)) * (visible & ~in_window)
    g = gate.to(query.dtype).reshape(1, -1, 1, 1)
    mixed = g * e + (1 - g) * lin
    # rows with no visible key (padding queries) come out 0, not NaN, so gradients stay finite
    return mixed / mixed.sum(-1, keepdim=True).clamp_min(torch.finfo(mixed.dtype).tiny)


def naive_hybrid_attention(query, key, value, fq, fk, gate, *, window: int, scaling: float, causal: bool = True,
                           key_valid: torch.Tensor | None = None, softcap: float | None = None) -> torch.Tensor:
    """The quadratic definition (module docstring), in float64: the reference for the chunked form."""
    weights = hybrid_attention_weights(query.double(), key.double(), fq.double(), fk.double(), gate.double(),
                                       window=window, scaling=scaling, causal=causal, key_valid=key_valid,
                                       softcap=softcap)
    return weights @ repeat_kv(value, query.shape[1] // key.shape[1]).double()
