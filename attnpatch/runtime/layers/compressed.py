"""The cache layer of KV compression methods: only the entries a method keeps, per sequence and
kv head, with their positions and validity, in preallocated storage written in place."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from ...ops.token_ranks import gather_tokens
from .base import FullLengthGeometry, MappedBatchOps

_FIELDS = ("keys", "values", "valid", "positions", "scores")


class CompressedKVLayer(FullLengthGeometry, MappedBatchOps, DynamicLayer):
    """Stores only the K/V entries a compression method keeps, per sequence and per kv head.

    keys/values (B, Hkv, K, D) are the stored entries; `valid` (B, Hkv, K) marks real entries (False
    for padding, evicted entries, and spare slots of a head keeping fewer than another);
    `positions` (B, Hkv, K) int32 are their absolute positions (keys are stored after RoPE, so
    positions only serve causality and the sink/recency rules); `scores` is the method's running
    score per entry where it keeps one (H2O). `policy` is the eviction policy's state (budget, decode
    override, ...), owned by the KV methods (methods/kv/eviction.py): the layer carries it, maps it
    with the batch, counts its bytes and tells it when slots are repacked, and never reads it. The
    layer reports the full sequence length, so positions of new tokens and the masks of other
    layers are what they would be without compression.

    Why preallocated: decoding writes each new token into a freed slot (an evicted entry's) or
    after the last used slot of a buffer with headroom, so no step copies the whole cache (a
    concatenation per token costs more than the attention it saves). Entries are therefore not
    in position order once slots are reused; `positions` says where each one belongs, and
    `new_slots` (B, Hkv, n) where the last update wrote. The views exposed as keys/values/... are
    the first `length` slots; `nbytes` counts the whole allocation, headroom included.
    """

    is_croppable = False

    def __init__(self, sliding_window: int | None = None, **kwargs):
        self._storage: dict[str, torch.Tensor | None] = dict.fromkeys(_FIELDS)
        self.length, self._all_valid, self.appended_at = 0, False, 0
        super().__init__(**kwargs)
        # with a sliding window, the method also keeps applying the model's window
        self._init_geometry(sliding_window)
        self.new_slots = self.freed = None
        self.headroom = True  # grow buffers with spare slots (a cache that only holds needs none)
        self._valid_before_evict = False
        self.policy = None  # the eviction policy's state (methods/kv/eviction.py), made by the method

    # --- the views: the first `length` slots of each buffer
    def _view(self, name):
        buffer = self._storage[name]
        return None if buffer is None else buffer[:, :, : self.length]

    def _set(self, name, value):
        if name == "valid":
            self._all_valid = False
        buffer = self._storage[name]
        if value is None:
            self._storage[name] = None
        elif buffer is not None and value.data_ptr() == buffer.data_ptr() and value.shape == buffer[:, :, : self.length].shape:
            pass  # an in-place edit of the view (`layer.valid &= ...`) assigned back
        elif buffer is not None and value.shape[2] == self.length and buffer.dtype == value.dtype \
                and buffer.device == value.device and buffer.shape[:2] == value.shape[:2]:
            buffer[:, :, : self.length].copy_(value)
        else:  # a new tensor (another device, a batch edit): it becomes the buffer
            self._storage[name] = value

    keys = property(lambda self: self._view("keys"), lambda self, v: self._set("keys", v))
    values = property(lambda self: self._view("values"), lambda self, v: self._set("values", v))
    valid = property(lambda self: self._view("valid"), lambda self, v: self._set("valid", v))
    positions = property(lambda self: self._view("positions"), lambda self, v: self._set("positions", v))
    scores = property(lambda self: self._view("scores"), lambda self, v: self._set("scores", v))

    def lazy_initialization(self, key_states, value_states):
        # set here, not by DynamicLayer, whose fields differ between transformers releases
        self.dtype, self.device, self.is_initialized = key_states.dtype, key_states.device, True
        b, h = key_states.shape[:2]
        self.length, self._all_valid = 0, False
        self._storage.update(
            keys=key_states.new_empty(b, h, 0, key_states.shape[-1]),
            values=value_states.new_empty(b, h, 0, value_states.shape[-1]),
            valid=torch.zeros(b, h, 0, dtype=torch.bool, device=key_states.device),
            positions=torch.zeros(b, h, 0, dtype=torch.int32, device=key_states.device))

    def _reserve(self, needed: int) -> None:
        """Every buffer holds at least `needed` slots; growth adds headroom so appends stay amortised O(1)."""
        spare = min(max(needed // 16, 1), 1024) if self.headroom else 0
        for name, buffer in self._storage.items():
            if buffer is not None and buffer.shape[2] < needed:
                grown = buffer.new_zeros(*buffer.shape[:2], needed + spare, *buffer.shape[3:])
                grown[:, :, : self.length] = buffer[:, :, : self.length]
                self._storage[name] = grown

    def all_valid(self) -> bool:
        """Every used slot holds a real entry (checked once after each change of `valid`, not per step)."""
        if not self._all_valid:
            self._all_valid = bool(self.valid.all())
        return self._all_valid

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, h, n = key_states.shape[:3]
        device = key_states.device
        new_positions = torch.arange(self.seen_tokens, self.seen_tokens + n, device=device, dtype=torch.int32)
        self.seen_tokens += n
        refilled = False
        if self.freed is not None and self.freed.shape[-1] >= n:  # the slots the last eviction freed
            slots, rest = self.freed[..., :n], self.freed[..., n:]
            self.freed = rest if rest.shape[-1] else None
            # every slot was valid before that eviction and all it freed are written again now
            refilled = self.freed is None and self._valid_before_evict
        elif not self.all_valid() and bool(((~self.valid).sum(-1) >= n).all()):  # every row has free slots
            order = torch.arange(self.length, device=device) / (self.length + 1)
            slots = torch.topk((~self.valid).to(torch.float32) - order, n, dim=-1).indices.sort(dim=-1).values
        else:  # append after the used slots: plain slice writes
            start = self.length
            self._reserve(start + n)
            self.length += n
            self._storage["keys"][:, :, start : start + n] = key_states
            self._storage["values"][:, :, start : start + n] = value_states
            self._storage["valid"][:, :, start : start + n] = True
            self._storage["positions"][:, :, start : start + n] = new_positions
            if self._storage["scores"] is not None:
                self._storage["scores"][:, :, start : start + n] = 0.0
            self.new_slots, self.appended_at = None, start
            return self.keys, self.values
        for name, new in (("keys", key_states), ("values", value_states)):
            self._storage[name][:, :, : self.length].scatter_(2, slots[..., None].expand(b, h, n, new.shape[-1]), new)
        self.valid.scatter_(2, slots, True)
        self.positions.scatter_(2, slots, new_positions.expand(b, h, n))
        if self._storage["scores"] is not None:
            self.scores.scatter_(2, slots, 0.0)
        self.new_slots = slots
        self._all_valid = refilled
        return self.keys, self.values

    def mark_new_padding(self, new_valid: torch.Tensor) -> None:
        """new_valid (B or 1, n): which of the tokens of the last update are real (padding is not)."""
        self._all_valid = False
        if self.new_slots is None:  # appended
            start = self.appended_at
            self.valid[:, :, start : start + new_valid.shape[-1]] &= new_valid[:, None, :]
            return
        written = torch.gather(self.valid, 2, self.new_slots)
        self.valid.scatter_(2, self.new_slots, written & new_valid[:, None, :].expand_as(written))

    def keep(self, index: torch.Tensor, valid: torch.Tensor) -> None:
        """Keep only the entries at `index` (B, Hkv, K), packed in that order; the rest is freed."""
        gathered = {name: (gather_tokens(view, index).contiguous() if name in ("keys", "values")
                           else torch.gather(view, -1, index))
                    for name in _FIELDS if (view := self._view(name)) is not None}
        gathered["valid"] = valid.contiguous()
        self._storage.update(gathered)
        self._all_valid = False
        self.length = index.shape[-1]
        self.new_slots = self.freed = None
        self._slots_repacked()

    def evict(self, kept: torch.Tensor, freed: torch.Tensor | None = None) -> None:
        """Free every entry not in `kept` (B, Hkv, length) in place: its slot is reused by the next token.
        `freed` (B, Hkv, e): the freed slots when every row freed the same number (found faster then)."""
        self._valid_before_evict = self._all_valid
        self.valid &= kept  # (through the setter: the all-valid flag is reset)
        self.freed = freed

    def free(self, freed: torch.Tensor) -> None:
        """`evict` when the slots are known: free `freed` (B, Hkv, e), valid entries, in place."""
        self._valid_before_evict = self._all_valid
        self.valid.scatter_(-1, freed, False)
        self._all_valid = False
        self.freed = freed

    def truncate(self, length: int) -> None:
        """Forget every entry written after the first `length` tokens (never evicted: nothing was yet)."""
        self.length = self.seen_tokens = length
        self.new_slots = self.freed = None
        self._all_valid = False
        self._slots_repacked()

    def _slots_repacked(self) -> None:
        if self.policy is not None:
            self.policy.slots_repacked()

    @property
    def stored_tokens(self) -> int:
        return self.length

    @property
    def nbytes(self) -> int:
        tensors = (*self._storage.values(), self.new_slots, self.freed)
        own = sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
        return own + (self.policy.nbytes if self.policy is not None else 0)

    def reset(self) -> None:
        super().reset()
        self.seen_tokens = self.length = 0
        self._all_valid = False
        self._storage = dict.fromkeys(_FIELDS)
        self.new_slots = self.freed = self.policy = None

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a compressed KV cache cannot be rolled back: evicted entries are gone")

    def _map(self, fn) -> None:
        self._all_valid = False
        self._storage = {name: (None if t is None else fn(t[:, :, : self.length].contiguous()))
                         for name, t in self._storage.items()}
        for name in ("new_slots", "freed"):
            value = getattr(self, name)
            if isinstance(value, torch.Tensor):
                setattr(self, name, fn(value))
        if self.policy is not None:
            self.policy.map(fn)
