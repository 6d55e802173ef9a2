"""KVzip-style context reconstruction: score each context entry by how much the model needs it to
repeat the context, then keep the best. Query-agnostic by construction: the score asks "what does
reproducing this context rely on", not "what does this question need"."""

from __future__ import annotations

import torch

from ...errors import PatchError
from ...ops.kv_select import accumulated_attention_scores, compact, select_mask
from ...ops.token_ranks import valid_rank
from ...runtime.cache import cache_kwargs
from ...runtime.layers import CompressedKVLayer
from ..base import Paper, ParamSpec
from .base import BUDGET_PARAMS, HEAD_ADAPTIVE_PARAM, KVCompressionMethod, decode_param
from .eviction import eviction_state

class KVzip(KVCompressionMethod):
    REPLAY_PROMPT = "\n\nRepeat the text above exactly:\n"
    name = "kvzip"
    paper = Paper('KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction', 2025, "https://arxiv.org/abs/2505.23416")
    deviations = (
        "compressing a context costs about 9x a dense prefill of it on 2 CPU cores (27.9 s vs 3.0 s at 2k tokens), where the paper's replay costs about two prefills (issue 41)",
    )
    summary = ("KVzip-style: prefill the context, replay it (an instruction to repeat it, then the context "
               "again, in chunks) and keep the entries with the largest attention any replay query gives them "
               "(per layer and kv head; scope='model' ranks every layer and head together, as the paper), plus sinks. Costs about two prefills; "
               "needs compress_context (it runs the replay).")
    params = BUDGET_PARAMS + (
        ParamSpec("sinks", int, 4, "first tokens always kept", low=0), HEAD_ADAPTIVE_PARAM, decode_param("grow"),
        ParamSpec("chunk", int, 2048, "context tokens replayed per forward pass", low=1),
        ParamSpec("scope", str, "layer", "what shares the budget: 'layer' gives each layer its own (per kv head, "
                  "or shared by its heads with head_adaptive); 'model' ranks the entries of every layer and kv head "
                  "together (KVzip's default). Storage is per layer as wide as its fullest kv head, so uneven "
                  "budgets hold more bytes than they keep entries (measured, not hidden)", choices=("layer", "model")),
    )
    replays_context = True
    replay_phase = None  # "collect" while the context is prefilled, "replay" while it is replayed

    def attention(self, call):
        layer = self.required_cache_layer(call)
        if layer is None or (eviction_state(layer).prefilled and self.replay_phase is None):
            return super().attention(call)  # no cache (warned), or a compressed context decoding
        if self.replay_phase is None:
            raise PatchError("kvzip scores a context by replaying it through the model: compress it with "
                             "attnpatch.compress_context(model, context_ids, 'kvzip', ...), then ask questions "
                             "on ctx.cache() or with ctx.generate()")
        lq = call.query.shape[-2]
        real = None if call.mask is None else call.mask[..., -lq:].any(dim=-2).any(dim=1)  # (B or 1, lq)
        if real is not None:
            layer.mark_new_padding(real)
        if self.replay_phase == "collect":  # the context itself: exact attention, everything kept
            return self.compute_output(call, layer, True)[0]
        # the replayed tokens see the whole context; record the most attention any of them gives each entry
        # (the output from the same weights: one pass over the replay, not an attention call plus a scoring one)
        scores, out = accumulated_attention_scores(
            call.query, layer.keys, layer.valid, call.scaling, softcap=call.softcap, key_positions=layer.positions,
            reduce="max", query_valid=None if real is None else real.expand(call.query.shape[0], -1),
            values=layer.values)
        state = eviction_state(layer)
        context = state.replay_scores.shape[-1]
        state.replay_scores = torch.maximum(state.replay_scores, scores[..., :context])
        return out

    @classmethod
    @torch.no_grad()
    def prefill_context(cls, model, cache, methods, context_ids, attention_mask, position_ids, prompt_ids=None):
        """Prefill the context into `cache` through the model patched with `methods` (this class's
        instances), replay it chunk by chunk after `prompt_ids` (1, P; the repeat instruction, see
        REPLAY_PROMPT; None: the context alone), then cut every layer to its budget by the scores.
        Returns the model output of the context's prefill (its last position's logits)."""
        keyword = cache_kwargs(model, cache)
        _set_phase(methods, "collect")
        try:
            prefilled = model(input_ids=context_ids, attention_mask=attention_mask, position_ids=position_ids,
                              **keyword, use_cache=True, logits_to_keep=1)
            layers = [layer for layer in cache.layers if isinstance(layer, CompressedKVLayer)]
            if not layers:  # compression=0: the model's own cache, nothing to score
                return prefilled
            if len(layers) != len(methods):
                raise PatchError(f"kvzip: {len(methods)} patched layers but {len(layers)} compressed cache layers")
            length = context_ids.shape[1]
            for layer in layers:
                eviction_state(layer).replay_scores = torch.zeros(layer.valid.shape, dtype=torch.float32,
                                                                  device=layer.valid.device)
            _set_phase(methods, "replay")
            batch = context_ids.shape[0]
            prompt = (context_ids.new_zeros(batch, 0) if prompt_ids is None
                      else prompt_ids.reshape(1, -1).to(context_ids.device).expand(batch, -1))
            for chunk_ids, chunk_mask in _replay_chunks(context_ids, attention_mask, methods[0].config["chunk"]):
                replay = torch.cat([prompt, chunk_ids], dim=1)
                replay_mask = torch.cat([torch.ones_like(prompt), chunk_mask], 1)
                mask = torch.cat([attention_mask, replay_mask], 1)
                # real replayed tokens continue the row's positions (padding takes none)
                positions = position_ids[:, -1:] + replay_mask.long().cumsum(-1).clamp(min=1)
                model(input_ids=replay, attention_mask=mask, position_ids=positions, **keyword, use_cache=True,
                      logits_to_keep=1)
                for layer in layers:  # the replayed tokens leave the cache again
                    layer.truncate(length)
            if methods[0].config["scope"] == "model":
                cut_model_to_budget(layers, methods)
            else:
                for layer, method in zip(layers, methods):
                    method.cut_to_budget(layer)
        finally:
            _set_phase(methods, None)
        return prefilled

    def cut_to_budget(self, layer: CompressedKVLayer) -> None:
        state = eviction_state(layer)
        state.budget = self.layer_budget(layer.valid[:, 0].sum(-1))
        kept = select_mask(state.replay_scores, layer.valid, state.budget, sinks=self.config["sinks"],
                           head_adaptive=self.config.get("head_adaptive"))
        layer.keep(*compact(kept))
        state.replay_scores = None


def cut_model_to_budget(layers: list[CompressedKVLayer], methods: list[KVzip]) -> None:
    """One budget for the whole model: every layer's budget x its kv heads, summed, goes to the
    highest replay scores of any layer and head; each head keeps its sinks (so none is left empty)."""
    ranked = []
    states = [eviction_state(layer) for layer in layers]
    for layer, state, method in zip(layers, states, methods):
        state.budget = method.layer_budget(layer.valid[:, 0].sum(-1))
        sink = layer.valid & (valid_rank(layer.valid) < method.config["sinks"])
        scores = torch.where(sink, float("inf"), state.replay_scores).masked_fill(~layer.valid, float("-inf"))
        ranked.append(scores.flatten(1))  # (B, H * L)
    flat = torch.cat(ranked, dim=1)
    total = sum(state.budget * layer.valid.shape[1] for layer, state in zip(layers, states))  # (B,)
    valid_total = sum(layer.valid.flatten(1).sum(-1) for layer in layers)
    total = torch.minimum(total, valid_total)
    order = torch.argsort(flat, dim=1, descending=True, stable=True)
    take = torch.arange(flat.shape[1], device=flat.device) < total[:, None]
    chosen = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, order, take)
    start = 0
    for layer, state in zip(layers, states):
        size = layer.valid[0].numel()
        layer.keep(*compact(chosen[:, start : start + size].reshape(layer.valid.shape) & layer.valid))
        state.replay_scores = None
        start += size


def _replay_chunks(context_ids: torch.Tensor, attention_mask: torch.Tensor, chunk: int):
    """(ids, mask) per replay pass: each row's real tokens, `chunk` at a time, left-padded to the
    longest row of the pass, so a padded row is cut where it would be cut alone."""
    rows = [ids[mask.bool()] for ids, mask in zip(context_ids, attention_mask)]
    for start in range(0, max(len(r) for r in rows), chunk):
        parts = [r[start : start + chunk] for r in rows]
        width = max(len(p) for p in parts)
        ids = context_ids.new_zeros(len(rows), width)
        mask = attention_mask.new_zeros(len(rows), width)
        for i, part in enumerate(parts):
            if len(part):
                ids[i, width - len(part):], mask[i, width - len(part):] = part, 1
        yield ids, mask


def _set_phase(methods, phase) -> None:
    for method in methods:
        method.replay_phase = phase
