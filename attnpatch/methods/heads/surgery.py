"""Physical removal of attention heads: which original head sits where after pruning, and the
slicing of projection weights by head blocks. No model knowledge: adapters say which projections
a module has (HeadAccess), methods/heads.py decides what to remove.

Layout rules. Query head h uses kv head h // group_size (transformers' repeat_kv). After pruning
a layer keeps the kv groups that still have a query head; every kept group gets the same number
of query slots (the largest group), and groups with fewer kept heads are filled with zero heads
(zero q rows, zero output columns), which add exactly nothing to the output. A saved checkpoint
needs the same geometry in every layer of a tower, so `padded_blocks` maps a layer onto the
tower's widest geometry with zero heads as well.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...errors import PatchError


@dataclass(frozen=True)
class HeadArrangement:
    """Where the original heads of one layer sit after pruning.

    kv_heads[g]: original kv head of kept group g; query_heads[g][i]: original query head in slot
    i of group g, or None for a zero (padding) head."""

    kv_heads: tuple[int, ...]
    query_heads: tuple[tuple[int | None, ...], ...]

    @classmethod
    def removing(cls, num_heads: int, num_kv_heads: int, removed, where: str = "this layer") -> HeadArrangement:
        removed = sorted({int(h) for h in removed})
        bad = [h for h in removed if not 0 <= h < num_heads]
        if bad:
            raise PatchError(f"heads {bad} are out of range for {where}, which has {num_heads} query heads "
                             f"(valid: 0..{num_heads - 1})")
        if len(removed) == num_heads:
            raise PatchError(f"removing all {num_heads} heads of {where} would leave no attention; keep at least one "
                             "head (to drop a whole layer, use fewer layers instead)")
        group = num_heads // num_kv_heads
        kept = [[h for h in range(g * group, (g + 1) * group) if h not in removed] for g in range(num_kv_heads)]
        kv = tuple(g for g in range(num_kv_heads) if kept[g])
        width = max(len(kept[g]) for g in kv)
        return cls(kv, tuple(tuple(kept[g]) + (None,) * (width - len(kept[g])) for g in kv))

    @property
    def num_kv_heads(self) -> int:
        return len(self.kv_heads)

    @property
    def group_size(self) -> int:
        return len(self.query_heads[0])

    @property
    def num_heads(self) -> int:
        return self.num_kv_heads * self.group_size

    @property
    def query_blocks(self) -> list[int | None]:
        return [h for group in self.query_heads for h in group]

    @property
    def padding_heads(self) -> int:
        return sum(h is None for h in self.query_blocks)


def check_surgery_site(site, method: str, interventions_attr: str) -> None:
    """What weight surgery needs of an attention module: separate q/k/v/output projections, and
    nothing patched on it yet (surgery comes first; other methods stack on the result)."""
    if site.heads is None:
        raise PatchError(f"{method} needs separate q/k/v/output projections; {site.path} has none it can rewrite "
                         "(fused qkv projections such as Phi3's are not supported)")
    taken = site.module.__dict__.get(interventions_attr)
    if taken:
        raise PatchError(f"{site.label} is already patched ({sorted(taken)}); apply {method} first: unpatch_model, "
                         f"patch {method}, then patch the other methods")


def gather_blocks(tensor: torch.Tensor, blocks: list[int | None], size: int, dim: int) -> torch.Tensor:
    """Blocks of `size` along `dim`: block i of the result is block blocks[i] of `tensor`, or zeros."""
    zeros = None
    parts = []
    for b in blocks:
        if b is None:
            if zeros is None:
                shape = list(tensor.shape)
                shape[dim] = size
                zeros = tensor.new_zeros(shape)
            parts.append(zeros)
        else:
            parts.append(tensor.narrow(dim, b * size, size))
    return torch.cat(parts, dim=dim).contiguous()


def sliced_linear(linear: nn.Linear, blocks: list[int | None], size: int, rows: bool) -> nn.Linear:
    """A new Linear keeping the output rows (rows=True) or input columns (False) of the given head
    blocks; bias follows the rows (an output projection keeps its whole bias)."""
    weight = gather_blocks(linear.weight.detach(), blocks, size, 0 if rows else 1)
    out_features, in_features = weight.shape
    new = nn.Linear(in_features, out_features, bias=linear.bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if linear.bias is not None:
            new.bias.copy_(gather_blocks(linear.bias.detach(), blocks, size, 0) if rows else linear.bias.detach())
    new.weight.requires_grad_(linear.weight.requires_grad)
    if new.bias is not None:
        new.bias.requires_grad_(linear.bias.requires_grad)
    return new


def padded_blocks(num_kv_heads: int, group_size: int, full_kv_heads: int, full_group_size: int):
    """Where a layer of (num_kv_heads, group_size) heads sits inside a (full_kv_heads,
    full_group_size) geometry: (query blocks, kv blocks), each the layer's own block index or None."""
    query = [g * group_size + i if g < num_kv_heads and i < group_size else None
             for g in range(full_kv_heads) for i in range(full_group_size)]
    kv = [g if g < num_kv_heads else None for g in range(full_kv_heads)]
    return query, kv


def unpadded_blocks(num_kv_heads: int, group_size: int, full_group_size: int):
    """The inverse of `padded_blocks`: (query blocks, kv blocks) of the padded tensor to keep."""
    query = [g * full_group_size + i for g in range(num_kv_heads) for i in range(group_size)]
    return query, list(range(num_kv_heads))


def zero_heads(out_proj: nn.Linear, head_dim: int) -> list[int]:
    """Query heads whose output-projection columns are all exactly zero: they add nothing (the
    padding a saved pruned checkpoint carries)."""
    blocks = out_proj.weight.detach().reshape(out_proj.out_features, -1, head_dim)
    return [h for h in range(blocks.shape[1]) if not bool(blocks[:, h].any())]


_MISSING = object()


def config_update(updates: list[tuple[object, dict]]):
    """Set config fields (a structural patch's new head counts) and return the function that puts
    the previous values back (fields the config did not have are removed again)."""
    changed = []
    for config, values in updates:
        changed.append((config, {name: config.__dict__.get(name, _MISSING) for name in values}))
        for name, value in values.items():
            setattr(config, name, value)

    def undo():
        for config, old in reversed(changed):
            for name, value in old.items():
                if value is _MISSING:
                    config.__dict__.pop(name, None)
                else:
                    setattr(config, name, value)

    return undo


# --- fusing kv heads (kv_merge)
def merge_groups(kv_weights: torch.Tensor, target: int, grouping: str) -> list[tuple[int, ...]]:
    """Which original kv heads fuse into each new one. kv_weights: (K, features) per-head
    projection weights (keys and values stacked), K divisible by `target`."""
    heads = kv_weights.shape[0]
    size = heads // target
    if grouping == "adjacent":
        return [tuple(range(j * size, (j + 1) * size)) for j in range(target)]
    unit = nn.functional.normalize(kv_weights.float(), dim=-1)
    similarity = unit @ unit.T
    left = list(range(heads))
    groups = []
    while left:
        seed = left.pop(0)
        closest = sorted(left, key=lambda h: (-float(similarity[seed, h]), h))[: size - 1]
        groups.append(tuple(sorted((seed, *closest))))
        left = [h for h in left if h not in closest]
    return groups


def fused_linear(linear: nn.Linear, groups: list[tuple[int, ...]], size: int, fusion: str) -> nn.Linear:
    """A Linear with one output block per group: the mean of the group's blocks, or its first."""
    def fuse(tensor: torch.Tensor) -> torch.Tensor:
        blocks = tensor.reshape(-1, size, *tensor.shape[1:])
        if fusion == "first":
            return torch.cat([blocks[g[0]] for g in groups])
        return torch.cat([blocks[list(g)].mean(0) for g in groups])

    new = sliced_linear(linear, [g[0] for g in groups], size, rows=True)  # shape, dtype, device, grad flags
    with torch.no_grad():
        new.weight.copy_(fuse(linear.weight.detach()))
        if linear.bias is not None:
            new.bias.copy_(fuse(linear.bias.detach()))
    return new


def augmented_rows(linear: nn.Linear) -> torch.Tensor:
    """weight with the bias (or zeros) as one more input column, in float64."""
    w = linear.weight.detach().double()
    bias = linear.bias.detach().double() if linear.bias is not None else w.new_zeros(w.shape[0])
    return torch.cat([w, bias[:, None]], dim=1)


def linear_from_rows(like: nn.Linear, rows: torch.Tensor) -> nn.Linear:
    """A Linear shaped by `rows` (the bias in the last column), on `like`'s device, dtype and grad flags."""
    new = nn.Linear(like.in_features, rows.shape[0], bias=like.bias is not None, device=like.weight.device,
                    dtype=like.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(rows[:, :-1])
        if like.bias is not None:
            new.bias.copy_(rows[:, -1])
    new.weight.requires_grad_(like.weight.requires_grad)
    if new.bias is not None:
        new.bias.requires_grad_(like.bias.requires_grad)
    return new
