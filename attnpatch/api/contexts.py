"""Compress a context once, then ask it any number of questions.

    ctx = compress_context(model, context_ids, "snapkv", compression=0.75)
    answer_ids = ctx.generate(question_ids, max_new_tokens=20)           # new tokens only
    model.generate(ctx.input_ids_with(question_ids), **cache_kwargs(model, ctx.cache()))  # by hand

The context is prefilled and compressed by the method before any question is seen
(query-agnostic). Every question then runs on its own copy of the compressed cache, whose layers
only grow after the context: neither a question nor its answer evicts context, whatever the
method's `decode` policy, and one question never sees another.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from ..config import PatchConfig
from ..errors import PatchError
from ..registry import get_method, resolve_params
from ..runtime.cache import cache_kwargs, cache_nbytes
from ..methods.kv.eviction import stop_evicting
from ..runtime.layers import CompressedKVLayer
from .patching import patch_model, patched_configs, patched_methods, unpatch_model


def token_ids(value, what: str) -> torch.Tensor:
    """`value` as a (B, L) tensor of token ids, or a PatchError saying what to pass instead."""
    if isinstance(value, str):
        raise PatchError(f"{what} is text; pass token ids: tokenizer(text, return_tensors='pt').input_ids")
    if isinstance(value, (list, tuple)) and value and all(isinstance(t, int) for t in value):
        value = torch.tensor(value)
    if not isinstance(value, torch.Tensor) or value.dtype.is_floating_point or value.dtype == torch.bool \
            or value.dim() not in (1, 2):
        raise PatchError(f"{what} must be token ids, a (B, L) or (L,) integer tensor; got "
                         f"{type(value).__name__}{'' if not isinstance(value, torch.Tensor) else f' {value.dtype} {tuple(value.shape)}'}"
                         " (from a tokenizer's output, pass its .input_ids and .attention_mask)")
    value = value if value.dim() == 2 else value[None]
    if value.shape[1] == 0:
        raise PatchError(f"{what} is empty: there is nothing to compress or ask")
    return value


# generate options whose extra sequences a compressed cache (one per context row) cannot serve
_ONE_SEQUENCE_PER_ROW = ("num_beams", "num_return_sequences")


@dataclass
class CompressedContext:
    """A compressed context: `cache()` hands out copies of it; `generate` asks one question."""

    model: nn.Module
    method: str
    input_ids: torch.Tensor  # (B, L) the context, as given
    attention_mask: torch.Tensor  # (B, L) 1 = real token (left padding is 0)
    template: DynamicCache
    patched_here: bool  # compress_context patched the model, and `close` unpatches it
    next_token_logits: torch.Tensor | None = None  # (B, 1, V) the prediction after the context's last token
    closed: bool = False

    def cache(self) -> DynamicCache:
        """A fresh copy of the compressed cache, to run one question (or conversation) on."""
        if self.closed:
            raise PatchError("this compressed context was closed (its method may be unpatched): compress the context "
                             "again with compress_context")
        return copy.deepcopy(self.template)

    @property
    def nbytes(self) -> int:
        """Bytes the compressed context holds (every tensor of its cache)."""
        return cache_nbytes(self.template)

    @property
    def length(self) -> int:
        """Context tokens seen (the cache reports this length to the model)."""
        return self.input_ids.shape[1]

    def input_ids_with(self, question_ids: torch.Tensor) -> torch.Tensor:
        """Context + question, as generate() expects them with the context's cache (it feeds only the
        tokens the cache has not seen)."""
        question_ids = self._batch(question_ids)
        return torch.cat([self.input_ids, question_ids.to(self.input_ids.device)], dim=1)

    def attention_mask_with(self, question_ids: torch.Tensor, question_mask: torch.Tensor | None = None) -> torch.Tensor:
        question_ids = self._batch(question_ids)
        if question_mask is None:
            question_mask = torch.ones_like(question_ids)
        return torch.cat([self.attention_mask, question_mask.to(self.attention_mask)], dim=1)

    @torch.no_grad()
    def generate(self, question_ids: torch.Tensor, question_mask: torch.Tensor | None = None, **generate_kwargs):
        """Generate after context + question on a copy of the compressed cache; returns only the
        new tokens (B, n). `generate_kwargs` go to model.generate (max_new_tokens, do_sample...)."""
        for option in _ONE_SEQUENCE_PER_ROW:
            if generate_kwargs.get(option, 1) != 1:
                raise PatchError(f"{option}={generate_kwargs[option]}: a compressed context holds one cache per context "
                                 "row, so it decodes one sequence per row (greedy or sampled); for several answers, "
                                 "call generate once per answer (each runs on its own copy of the cache)")
        ids = self.input_ids_with(question_ids)
        generate_kwargs.setdefault("pad_token_id", getattr(self.model.generation_config, "pad_token_id", None) or 0)
        out = self.model.generate(input_ids=ids, attention_mask=self.attention_mask_with(question_ids, question_mask),
                                  **cache_kwargs(self.model, self.cache()), **generate_kwargs)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        return sequences[:, ids.shape[1]:]

    def close(self) -> None:
        """Unpatch the model if compress_context patched it; the context cannot be used afterwards."""
        if self.patched_here:
            unpatch_model(self.model)
            self.patched_here = False
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _batch(self, question_ids: torch.Tensor) -> torch.Tensor:
        question_ids = token_ids(question_ids, "the question")
        if question_ids.shape[0] == 1 and self.input_ids.shape[0] > 1:
            question_ids = question_ids.expand(self.input_ids.shape[0], -1)
        if question_ids.shape[0] != self.input_ids.shape[0]:
            raise PatchError(f"the question batch has {question_ids.shape[0]} rows and the context "
                             f"{self.input_ids.shape[0]}; pass one question per context row (or one for all)")
        return question_ids


def _ensure_patched(model: nn.Module, method: str, params: dict) -> bool:
    """Patch the model with the method unless it already is; True when patched here."""
    configs = patched_configs(model)
    if not configs:
        patch_model(model, method, **params)
        return True
    if len(configs) == 1 and configs[0].method == method:
        wanted = resolve_params(method, dict(params))
        if params and wanted != configs[0].params:
            raise PatchError(f"compress_context: the model is patched with {method} {configs[0].params}, not with "
                             f"{wanted}; unpatch it first or pass no parameters to use the existing patch")
        return False
    raise PatchError(f"compress_context: the model is already patched with {[c.method for c in configs]}; "
                     f"unpatch_model(model) first to compress with {method!r}")


@torch.no_grad()
def compress_context(model: nn.Module, context_ids: torch.Tensor, method: str | PatchConfig,
                     attention_mask: torch.Tensor | None = None, tokenizer=None, **params) -> CompressedContext:
    """Prefill `context_ids` (B, L; left-padded rows with `attention_mask`) once through the model
    patched with a KV compression `method`, and return the compressed context. The model stays
    patched (the compressed cache needs the method's attention) until `ctx.close()` when this
    call patched it; a model already patched with the same method is used as it is.
    `tokenizer`: for methods that replay the context (kvzip), to write their instruction (without
    one, the context is replayed alone)."""
    if isinstance(method, PatchConfig):
        method, params = method.method, {**method.params, **params}
    if get_method(method).cache_layer_class is None:
        raise PatchError(f"compress_context needs a method that keeps its own KV cache (the kv-compressed family, "
                         f"e.g. snapkv, tova, knorm, kv_quant); {method!r} keeps none")
    if isinstance(context_ids, Mapping) and "input_ids" in context_ids:  # a tokenizer's BatchEncoding
        attention_mask = context_ids.get("attention_mask") if attention_mask is None else attention_mask
        context_ids = context_ids["input_ids"]
    context_ids = token_ids(context_ids, "the context")
    device = next(model.parameters()).device
    context_ids = context_ids.to(device)
    if attention_mask is not None:
        attention_mask = attention_mask if attention_mask.dim() == 2 else attention_mask[None]
        if tuple(attention_mask.shape) != tuple(context_ids.shape):
            raise PatchError(f"attention_mask has shape {tuple(attention_mask.shape)}, the context "
                             f"{tuple(context_ids.shape)}: one mask entry per context token")
    mask = torch.ones_like(context_ids) if attention_mask is None else attention_mask.to(device)
    patched_here = _ensure_patched(model, method, params)
    try:
        cache = DynamicCache(config=model.config)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # a left-padded row's positions start at 0, as generate's
        method_class = get_method(method)
        if getattr(method_class, "replays_context", False):
            instances = [m for m in patched_methods(model) if isinstance(m, method_class)]
            prompt = None if tokenizer is None else tokenizer(method_class.REPLAY_PROMPT, add_special_tokens=False,
                                                              return_tensors="pt")["input_ids"]
            out = method_class.prefill_context(model, cache, instances, context_ids, mask, positions, prompt)
        else:
            out = model(input_ids=context_ids, attention_mask=mask, position_ids=positions,
                        **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
        for layer in cache.layers:
            if isinstance(layer, CompressedKVLayer):
                stop_evicting(layer)  # after the context, nothing is evicted
    except BaseException:
        if patched_here:
            unpatch_model(model)
        raise
    return CompressedContext(model, method, context_ids, mask, cache, patched_here, out.logits[:, -1:])


def context_replaying_method(model: nn.Module) -> str | None:
    """The name of the method the model is patched with when it can only compress through
    `compress_context` (it replays the context, as kvzip does), else None."""
    for config in patched_configs(model):
        if getattr(get_method(config.method), "replays_context", False):
            return config.method
    return None


@torch.no_grad()
def prefill_cache(model: nn.Module, input_ids: torch.Tensor, tokenizer=None) -> tuple[DynamicCache, torch.Tensor]:
    """Prefill `input_ids` (1, L) into a new cache as the patched method wants it: through
    `compress_context` for a method that replays the context (kvzip), else one forward. Returns
    the cache, ready to decode, and the last position's logits (1, 1, V)."""
    method = context_replaying_method(model)
    if method is not None:
        context = compress_context(model, input_ids, method, tokenizer=tokenizer)
        return context.template, context.next_token_logits
    cache = DynamicCache(config=model.config)
    out = model(input_ids=input_ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
    return cache, out.logits[:, -1:]

