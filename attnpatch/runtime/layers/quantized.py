"""The cache layer of kv_quant: K/V stored quantised, with full-precision sinks and residual."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from ...ops.quant import concat, dequantize, quantize
from .base import no_tokens


class QuantizedStore:
    """The quantised K/V of sequences that share one layout, padding stripped: the first `sinks`
    tokens in full precision, then quantised groups (packed codes and float16 scales only; they are
    dequantised on the fly at each step), then a full-precision residual of the newest tokens."""

    def __init__(self, bits: int, group: int, residual: int, sinks: int, dtype):
        self.bits, self.group, self.residual, self.sinks, self.dtype = bits, group, residual, sinks, dtype
        self.sink_keys = self.sink_values = None
        self.keys = self.values = None  # the residual
        self.quant_keys = self.quant_values = None

    def append(self, key_states, value_states) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new tokens; returns every stored key and value (dequantised) in order."""
        if self.sink_keys is None:
            self.sink_keys, self.keys = no_tokens(key_states), no_tokens(key_states)
            self.sink_values, self.values = no_tokens(value_states), no_tokens(value_states)
        room = self.sinks - self.sink_keys.shape[-2]
        if room > 0:
            self.sink_keys = torch.cat([self.sink_keys, key_states[..., :room, :]], dim=-2)
            self.sink_values = torch.cat([self.sink_values, value_states[..., :room, :]], dim=-2)
            key_states, value_states = key_states[..., room:, :], value_states[..., room:, :]
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        flush = (self.keys.shape[-2] - self.residual) // self.group * self.group
        if flush > 0:
            qk = quantize(self.keys[..., :flush, :], self.bits, self.group, "tokens")
            qv = quantize(self.values[..., :flush, :], self.bits, self.group, "channels")
            self.quant_keys = qk if self.quant_keys is None else concat([self.quant_keys, qk])
            self.quant_values = qv if self.quant_values is None else concat([self.quant_values, qv])
            self.keys, self.values = self.keys[..., flush:, :].clone(), self.values[..., flush:, :].clone()
        parts_k, parts_v = [self.sink_keys], [self.sink_values]
        if self.quant_keys is not None:
            parts_k.append(dequantize(self.quant_keys, self.dtype))
            parts_v.append(dequantize(self.quant_values, self.dtype))
        return torch.cat(parts_k + [self.keys], dim=-2), torch.cat(parts_v + [self.values], dim=-2)

    @property
    def nbytes(self) -> int:
        total = sum(t.numel() * t.element_size() for t in (self.sink_keys, self.sink_values, self.keys, self.values)
                    if isinstance(t, torch.Tensor))
        return total + sum(q.nbytes for q in (self.quant_keys, self.quant_values) if q is not None)


class QuantizedKVLayer(DynamicLayer):
    """KV entries stored quantised (KIVI-style), with full-precision sinks and recent residual.

    The prompt is attended in full precision and stored when the method commits it (`commit`, with
    the prompt's left padding): the first `sinks` tokens stay in full precision; later tokens enter
    a full-precision residual, and whenever it holds `residual + group` tokens its oldest `group`
    are quantised: keys per channel over the group's tokens, values per token over groups of
    `group` channels. `update` returns all keys and values (dequantised) in order, so the model's
    masks apply unchanged. Padding is never stored: sequences with the same left padding share one
    `QuantizedStore` of their real tokens, so a padded sequence keeps its own first tokens as sinks
    and groups its tokens as it would alone.
    """

    is_croppable = False

    def __init__(self, bits: int = 4, group: int = 32, residual: int = 64, sinks: int = 4, **kwargs):
        super().__init__(**kwargs)
        self.bits, self.group, self.residual, self.sinks = bits, group, residual, sinks
        self.seen_tokens = 0
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None  # the prompt, until committed
        self.stores: list[tuple[torch.Tensor, int, QuantizedStore]] = []  # (rows, left padding, store)

    def lazy_initialization(self, key_states, value_states):
        self.dtype, self.device, self.is_initialized = key_states.dtype, key_states.device, True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:  # the prompt: attended as it is, stored once its padding is known
            self.lazy_initialization(key_states, value_states)
            self.seen_tokens += key_states.shape[-2]
            self.pending = (key_states, value_states)
            return key_states, value_states
        if self.pending is not None:
            self.commit(None)
        self.seen_tokens += key_states.shape[-2]
        return self._append(key_states, value_states, skip_padding=False)

    def commit(self, padding: torch.Tensor | None) -> None:
        """Store the prompt, quantised; `padding` (B,) is each sequence's left padding (None: none)."""
        keys, values = self.pending
        self.pending = None
        pads = padding if padding is not None else torch.zeros(keys.shape[0], dtype=torch.long)
        for pad in sorted(set(pads.tolist())):
            rows = (pads == pad).nonzero().squeeze(-1).to(keys.device)
            self.stores.append((rows, int(pad), QuantizedStore(self.bits, self.group, self.residual, self.sinks,
                                                                keys.dtype)))
        self._append(keys, values, skip_padding=True)

    def _append(self, key_states, value_states, skip_padding: bool):
        if len(self.stores) == 1 and self.stores[0][1] == 0:  # no padding: one store, no copies
            return self.stores[0][2].append(key_states, value_states)
        b, h, _, d = key_states.shape
        keys = key_states.new_zeros(b, h, self.seen_tokens, d)
        values = value_states.new_zeros(b, h, self.seen_tokens, value_states.shape[-1])
        for rows, pad, store in self.stores:
            skip = pad if skip_padding else 0  # the padding itself is never stored
            k, v = store.append(key_states[rows, :, skip:], value_states[rows, :, skip:])
            keys[rows, :, pad:], values[rows, :, pad:] = k, v  # padding slots stay zero (the mask hides them)
        return keys, values

    def get_seq_length(self) -> int:
        return self.seen_tokens

    @property
    def nbytes(self) -> int:
        """Bytes of everything the layer keeps: sinks, packed codes with scales, residual (and a
        prompt not yet committed). Nothing dequantised is kept between steps."""
        pending = sum(t.numel() * t.element_size() for t in self.pending) if self.pending is not None else 0
        rows = sum(rows.numel() * rows.element_size() for rows, *_ in self.stores)  # which sequences each store holds
        return pending + rows + sum(store.nbytes for *_, store in self.stores)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a quantised KV cache cannot be rolled back")

    def reorder_cache(self, beam_idx):
        raise NotImplementedError("beam search is not supported with kv_quant yet")
