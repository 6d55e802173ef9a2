"""The cache layer of kv_quant: K/V stored quantised, with full-precision sinks and residual."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from ...ops.quant import concat, dequantize, quantize


class QuantizedKVLayer(DynamicLayer):
    """KV entries stored quantised (KIVI-style), with full-precision sinks and recent residual.

    The first `sinks` tokens stay in full precision; new tokens enter a full-precision residual,
    and whenever it holds `residual + group` tokens its oldest `group` are quantised: keys per
    channel over the group's tokens, values per token over groups of `group` channels. `update`
    returns all keys and values (dequantised) in order, so the model's masks apply unchanged.
    """

    is_croppable = False

    def __init__(self, bits: int = 4, group: int = 32, residual: int = 64, sinks: int = 4, **kwargs):
        super().__init__(**kwargs)
        self.bits, self.group, self.residual, self.sinks = bits, group, residual, sinks
        self.seen_tokens = 0
        self.sink_keys = self.sink_values = None
        self.quant_keys = self.quant_values = None
        self.dequant_keys = self.dequant_values = None  # cache of the dequantised part

    def lazy_initialization(self, key_states, value_states):
        self.dtype, self.device, self.is_initialized = key_states.dtype, key_states.device, True
        self.sink_keys, self.sink_values = key_states[..., :0, :], value_states[..., :0, :]
        self.keys, self.values = key_states[..., :0, :], value_states[..., :0, :]  # the residual

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.seen_tokens += key_states.shape[-2]
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
            self.keys, self.values = self.keys[..., flush:, :], self.values[..., flush:, :]
            self.dequant_keys = self._extend(self.dequant_keys, dequantize(qk, self.dtype))
            self.dequant_values = self._extend(self.dequant_values, dequantize(qv, self.dtype))
        parts_k = [self.sink_keys] + ([self.dequant_keys] if self.dequant_keys is not None else []) + [self.keys]
        parts_v = [self.sink_values] + ([self.dequant_values] if self.dequant_values is not None else []) + [self.values]
        return torch.cat(parts_k, dim=-2), torch.cat(parts_v, dim=-2)

    @staticmethod
    def _extend(existing, new):
        return new if existing is None else torch.cat([existing, new], dim=-2)

    def get_seq_length(self) -> int:
        return self.seen_tokens

    @property
    def nbytes(self) -> int:
        """Bytes of what is stored: sinks, packed codes with scales, residual. The dequantised
        copy kept for speed is a working buffer, counted apart in `working_nbytes`."""
        total = sum(t.numel() * t.element_size() for t in (self.sink_keys, self.sink_values, self.keys, self.values)
                    if isinstance(t, torch.Tensor))
        return total + sum(q.nbytes for q in (self.quant_keys, self.quant_values) if q is not None)

    @property
    def working_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.dequant_keys, self.dequant_values) if t is not None)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a quantised KV cache cannot be rolled back")

    def reorder_cache(self, beam_idx):
        raise NotImplementedError("beam search is not supported with kv_quant yet")
