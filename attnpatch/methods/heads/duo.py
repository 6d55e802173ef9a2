"""`duo_heads` (DuoAttention): retrieval kv heads keep full attention and the whole KV cache;
streaming kv heads attend the first `sinks` tokens and a recent `window`, and the cache keeps only
those for them, so KV memory falls with the share of streaming heads.

Which heads retrieve is learnt by `train_duo_heads` (attnpatch/duo_training.py) and saved per layer
as `retrieval_heads` in layer_params. With GQA a kv head and its query group share one role.
"""

from __future__ import annotations

import dataclasses

import torch

from ...errors import PatchError
from ...ops.token_ranks import valid_rank
from ...ops.sliding import sliding_window_attention
from ...runtime.call import run_rows_without_padding
from ...runtime.exact import exact_attention, sdpa_attention
from ...runtime.layers import DuoHeadLayer
from ..base import Method, Paper, ParamSpec


def _query_heads(kv_heads: list[int], groups: int) -> list[int]:
    return [h * groups + j for h in kv_heads for j in range(groups)]


class DuoHeads(Method):
    name = "duo_heads"
    paper = Paper('DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming Heads', 2024, "https://arxiv.org/abs/2410.10819")
    deviations = ()
    family = "head-pruned"
    summary = ("DuoAttention: retrieval kv heads keep full attention and the full KV cache; streaming heads attend "
               "sinks + a recent window and cache only those (train_duo_heads learns which is which).")
    model_kinds = ("decoder",)
    interventions = frozenset({"attention", "cache"})
    cache_layer_class = DuoHeadLayer
    params = (
        ParamSpec("retrieval_heads", list, None, "kv heads of this layer with full attention and cache (per layer "
                  "via layer_params, e.g. from train_duo_heads); unset = every head of the layer streams",
                  low=0, optional=True),
        ParamSpec("sinks", int, 16, "first tokens streaming heads always see", low=0),
        ParamSpec("window", int, 256, "recent tokens streaming heads see (the query itself included)", low=1),
    )

    def __init__(self, site, **params):
        super().__init__(site, **params)
        self.gate = None  # (Hkv,) mixing weights while train_duo_heads optimises them

    def check_site(self, site) -> None:
        chosen = self.config["retrieval_heads"] or []
        bad = sorted(h for h in chosen if h >= site.num_kv_heads)
        if bad:
            raise PatchError(f"retrieval_heads {bad} are out of range for {site.label}, which has {site.num_kv_heads} "
                             f"kv heads (valid: 0..{site.num_kv_heads - 1})")
        self.retrieval = sorted(set(chosen))
        self.streaming = [h for h in range(site.num_kv_heads) if h not in self.retrieval]

    def new_cache_layer(self, sliding_window=None):
        return DuoHeadLayer(self.retrieval, self.streaming, self.config["sinks"], self.config["window"], sliding_window)

    def needs_unpadded_rows(self, call) -> bool:  # without its cache: sinks are a row's first real tokens
        return call.cache_layer is None and call.causal and bool(self.streaming)

    # --- attention
    def _stream(self, call) -> torch.Tensor:
        return sliding_window_attention(call.query, call.key, call.value, call.mask, window=self.config["window"],
                                        sinks=self.config["sinks"], causal=call.causal, scaling=call.scaling,
                                        softcap=call.softcap)

    @staticmethod
    def _heads(call, kv_heads: list[int]):
        q = _query_heads(kv_heads, call.kv_groups)
        sub = dataclasses.replace(call, query=call.query[:, q], key=call.key[:, kv_heads], value=call.value[:, kv_heads])
        return sub, q

    def attention(self, call):
        layer = call.cache_layer
        if self.gate is not None:  # training the gates: every head mixes both outputs
            mix = self.gate.clamp(0, 1).to(call.query.dtype).repeat_interleave(call.kv_groups)[None, :, None, None]
            return mix * exact_attention(call) + (1 - mix) * self._stream(call)
        out = torch.empty_like(call.query)
        if isinstance(layer, DuoHeadLayer):
            self._attend_cached(call, layer, out)
            layer.trim()
            return out
        for heads, compute in ((self.retrieval, exact_attention), (self.streaming, self._stream)):
            if heads:
                sub, q = self._heads(call, heads)
                out[:, q] = compute(sub)
        return out

    def _attend_cached(self, call, layer: DuoHeadLayer, out: torch.Tensor) -> None:
        lq = call.query.shape[-2]
        if call.mask is not None:  # padding among the new tokens
            layer.mark_new_padding(call.mask[..., -lq:].any(dim=-2).any(dim=1))
        all_valid = not layer.padded
        groups = call.kv_groups
        if self.retrieval:
            q = _query_heads(self.retrieval, groups)
            mask = None if all_valid else layer.valid[:, None, None, :]
            sub = dataclasses.replace(call, query=call.query[:, q], key=layer.keys, value=layer.values, mask=mask,
                                      causal=True)
            out[:, q] = exact_attention(sub)
        if self.streaming:
            q = _query_heads(self.streaming, groups)
            sub = dataclasses.replace(call, query=call.query[:, q])
            out[:, q] = window_cache_attention(sub, layer, self.config["sinks"], self.config["window"],
                                               all_valid=all_valid)


def window_cache_attention(call, layer: DuoHeadLayer, sinks: int, window: int, all_valid: bool | None = None):
    """The call's queries (the streaming heads' query heads) over the layer's streaming store:
    each query sees its row's first `sinks` real tokens and its newest `window` (itself included),
    counted in real tokens so a left-padded row attends as it would alone. While nothing has been
    dropped yet (a prefill) this is the block-wise sliding-window kernel on the whole prompt (each
    padded row on its real tokens); afterwards the store holds at most sinks + window - 1 + new
    tokens, attended under an explicit mask."""
    lq = call.query.shape[-2]
    positions = layer.stream_positions
    all_valid = not layer.padded if all_valid is None else all_valid

    def windowed(c):
        return sliding_window_attention(c.query, c.key, c.value, c.mask, window=window, sinks=sinks, causal=True,
                                        scaling=c.scaling, softcap=c.softcap)

    if positions.numel() == layer.seen_tokens and lq == positions.numel():  # a prefill: the whole prompt is here
        # the model's own mask: padding, and the model's sliding window where it has one
        whole = dataclasses.replace(call, key=layer.stream_keys, value=layer.stream_values, causal=True)
        pads = None if all_valid else whole.leading_padding()
        if all_valid or pads is None:
            return windowed(whole)
        return run_rows_without_padding(windowed, whole, pads)
    if lq == 1 and all_valid and layer.trimmed_at == layer.seen_tokens - 1:
        # a decoding step right after the trim for the previous token: the store holds this query's
        # sinks and window and nothing else (its own key included), so nothing needs masking
        sub = dataclasses.replace(call, key=layer.stream_keys, value=layer.stream_values, mask=None, causal=False)
        return sdpa_attention(sub, None, False)
    q_positions = torch.arange(layer.seen_tokens - lq, layer.seen_tokens, device=positions.device)
    if all_valid:  # no padding: a position is its own rank among real tokens (no pass over the sequence)
        k_rank, q_rank = positions[None, None, :], q_positions[None, :, None]
        allowed = (k_rank <= q_rank) & ((k_rank < sinks) | (q_rank - k_rank < window))
    else:
        rank = valid_rank(layer.valid)  # (B, L) rank of each position among real tokens
        k_rank, q_rank = rank[:, positions][:, None, :], rank[:, -lq:][:, :, None]
        allowed = (k_rank <= q_rank) & ((k_rank < sinks) | (q_rank - k_rank < window))
        allowed = allowed & layer.valid[:, positions][:, None, :]
    if layer.sliding_window is not None:  # the model's own window, in absolute positions as its mask counts
        allowed = allowed & ((q_positions[:, None] - positions[None, :]) < layer.sliding_window)[None]
    sub = dataclasses.replace(call, key=layer.stream_keys, value=layer.stream_values, mask=None, causal=True)
    return sdpa_attention(sub, allowed[:, None], False)
