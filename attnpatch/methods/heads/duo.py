"""`duo_heads` (DuoAttention): retrieval kv heads keep full attention and the whole KV cache;
streaming kv heads attend the first `sinks` tokens and a recent `window`, and the cache keeps only
those for them, so KV memory falls with the share of streaming heads.

Which heads retrieve is learnt by `train_duo_heads` (attnpatch/duo_training.py) and saved per layer
as `retrieval_heads` in layer_params. With GQA a kv head and its query group share one role.
"""

from __future__ import annotations

import dataclasses

import torch
from transformers.cache_utils import DynamicLayer

from ...runtime.cache import _FullLengthGeometry, _MappedBatchOps
from ...errors import PatchError
from ...ops.reference import causal_mask
from ...ops.sliding import sliding_window_attention
from ..base import Method, ParamSpec
from ...runtime.exact import exact_attention, sdpa_attention


class DuoHeadLayer(_FullLengthGeometry, _MappedBatchOps, DynamicLayer):
    """Cache of one layer under duo_heads: retrieval kv heads store every token (keys/values,
    (B, Hr, L, D)); streaming kv heads store the sinks and the newest window - 1 tokens
    (stream_keys/stream_values (B, Hs, S, D) at absolute `stream_positions`). `valid` (B, L) marks
    real (non-padding) tokens. `update` stores new tokens and returns them; the method reads the
    stores and calls `trim` after attending."""

    is_croppable = False

    def __init__(self, retrieval: list[int], streaming: list[int], sinks: int, window: int,
                 sliding_window: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self._init_geometry(sliding_window)
        self.retrieval, self.streaming = retrieval, streaming
        self.sinks, self.window = sinks, window
        self.stream_keys = self.stream_values = self.stream_positions = self.valid = None

    def lazy_initialization(self, key_states, value_states):
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states[:, self.retrieval, :0]
        self.values = value_states[:, self.retrieval, :0]
        self.stream_keys = key_states[:, self.streaming, :0]
        self.stream_values = value_states[:, self.streaming, :0]
        self.stream_positions = torch.zeros(0, dtype=torch.long, device=key_states.device)
        self.valid = torch.zeros(key_states.shape[0], 0, dtype=torch.bool, device=key_states.device)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        self.keys = torch.cat([self.keys, key_states[:, self.retrieval]], dim=-2)
        self.values = torch.cat([self.values, value_states[:, self.retrieval]], dim=-2)
        self.stream_keys = torch.cat([self.stream_keys, key_states[:, self.streaming]], dim=-2)
        self.stream_values = torch.cat([self.stream_values, value_states[:, self.streaming]], dim=-2)
        new = torch.arange(self.seen_tokens, self.seen_tokens + n, device=self.stream_positions.device)
        self.stream_positions = torch.cat([self.stream_positions, new])
        self.valid = torch.cat([self.valid, self.valid.new_ones(self.valid.shape[0], n)], dim=-1)
        self.seen_tokens += n
        return key_states, value_states

    def trim(self) -> None:
        """Streaming heads keep the sinks and the newest window - 1 tokens (what the next query sees).
        A left-padded sequence's sinks are its first real tokens: every sequence's are kept."""
        positions = self.stream_positions
        first_real = int((~self.valid).long().cumprod(dim=-1).sum(dim=-1).max())
        keep = (positions < first_real + self.sinks) | (positions > self.seen_tokens - self.window)
        if bool(keep.all()):
            return
        index = keep.nonzero().squeeze(-1)
        self.stream_keys = self.stream_keys.index_select(-2, index).contiguous()
        self.stream_values = self.stream_values.index_select(-2, index).contiguous()
        self.stream_positions = positions[index]

    @property
    def nbytes(self) -> int:
        tensors = (self.keys, self.values, self.stream_keys, self.stream_values)
        return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = self.stream_keys = self.stream_values = None
        self.stream_positions = self.valid = None
        self.seen_tokens = 0
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a duo_heads cache cannot be rolled back: streaming heads dropped old tokens")

    def _map(self, fn) -> None:
        for name in ("keys", "values", "stream_keys", "stream_values", "valid"):
            value = getattr(self, name)
            if isinstance(value, torch.Tensor):
                setattr(self, name, fn(value))


def _query_heads(kv_heads: list[int], groups: int) -> list[int]:
    return [h * groups + j for h in kv_heads for j in range(groups)]


class DuoHeads(Method):
    name = "duo_heads"
    family = "head-pruned"
    summary = ("DuoAttention: retrieval kv heads keep full attention and the full KV cache; streaming heads attend "
               "sinks + a recent window and cache only those (train_duo_heads learns which is which).")
    model_kinds = ("decoder",)
    interventions = frozenset({"attention", "cache"})
    uses_state_cache = True
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
            layer.valid[:, -lq:] &= call.mask[..., -lq:].any(dim=-2).any(dim=1).expand(layer.valid.shape[0], -1)
        all_valid = bool(layer.valid.all())
        groups = call.kv_groups
        if self.retrieval:
            q = _query_heads(self.retrieval, groups)
            mask = None if all_valid else layer.valid[:, None, None, :]
            sub = dataclasses.replace(call, query=call.query[:, q], key=layer.keys, value=layer.values, mask=mask,
                                      causal=True)
            out[:, q] = exact_attention(sub)
        if self.streaming:
            q = _query_heads(self.streaming, groups)
            positions = layer.stream_positions
            valid = layer.valid[:, positions]
            sub = dataclasses.replace(call, query=call.query[:, q], key=layer.stream_keys, value=layer.stream_values,
                                      mask=None if all_valid else valid[:, None, None, :], causal=True)
            if all_valid and positions.numel() == layer.seen_tokens:  # nothing evicted yet, no padding
                out[:, q] = self._stream(sub)
                return
            # sinks and window counted in real tokens (a padded sequence attends as it would alone)
            rank = layer.valid.long().cumsum(dim=-1) - 1  # (B, L) rank of each position among real tokens
            k_rank, q_rank = rank[:, positions][:, None, :], rank[:, -lq:][:, :, None]
            allowed = (k_rank <= q_rank) & ((k_rank < self.config["sinks"]) | (q_rank - k_rank < self.config["window"]))
            allowed = (allowed & valid[:, None, :])[:, None]
            out[:, q] = sdpa_attention(sub, allowed, False)


def duo_reference_mask(lq: int, lk: int, retrieval: list[int], num_kv_heads: int, groups: int, sinks: int,
                       window: int, device=None) -> torch.Tensor:
    """(Hq, Lq, Lk) boolean mask duo_heads computes under: causal for retrieval heads' queries,
    causal sinks + window for streaming heads' (for tests against naive attention)."""
    from ...ops.reference import window_mask

    full = causal_mask(lq, lk, device)
    stream = window_mask(lq, lk, window, sinks, True, device)
    rows = [full if h // groups in retrieval else stream for h in range(num_kv_heads * groups)]
    return torch.stack(rows)
