"""KeyDiff: keep the keys least similar to the layer's mean key; no attention needed."""

from __future__ import annotations

import torch

from ..base import Paper
from .base import KVCompressionMethod, decode_param


class KeyDiff(KVCompressionMethod):
    name = "keydiff"
    paper = Paper('KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM Inference in Resource-Constrained Environments', 2025, "https://arxiv.org/abs/2504.15364")
    deviations = ()
    summary = ("KeyDiff: keep the most distinctive keys, scored by negative cosine similarity to the mean of the "
               "head's valid keys (an anchor); query-agnostic, needs no attention weights, so it works with "
               "fused attention kernels. Compresses the prompt once by default.")
    params = KVCompressionMethod.params[:-1] + (decode_param("grow"),)

    def score(self, keys, attention, valid):
        keys = torch.nn.functional.normalize(keys.float(), dim=-1)
        weights = valid.to(keys.dtype)[..., None]
        anchor = (keys * weights).sum(-2, keepdim=True) / weights.sum(-2, keepdim=True).clamp_min(1.0)
        return -torch.nn.functional.cosine_similarity(keys, anchor, dim=-1)
