"""Where tokens sit among the valid ones of their row: leading padding, ranks among valid entries (in
storage or position order) and gathering entries by index along the token dimension."""

from __future__ import annotations

import torch


def leading_invalid(valid: torch.Tensor) -> torch.Tensor:
    """Entries before each row's first valid one (a left-padded row's padding), reduced over the last dim."""
    return (~valid).long().cumprod(dim=-1).sum(dim=-1)


def valid_rank(valid: torch.Tensor) -> torch.Tensor:
    """Rank of each entry among the valid ones of its row, oldest = 0 (padding does not count)."""
    return torch.cumsum(valid.long(), -1) - 1


def position_rank(positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Rank of each valid entry among the valid ones of its row by position, oldest = 0, for entries
    stored out of order (a cache reusing freed slots); equals valid_rank when stored in order."""
    key = torch.where(valid, positions.long(), torch.iinfo(torch.long).max)
    order = torch.argsort(key, dim=-1, stable=True)
    ranks = torch.arange(key.shape[-1], device=key.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, ranks)


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, Hkv, L, ...) gathered along L with index (B, Hkv, K)."""
    expand = index.reshape(*index.shape, *([1] * (x.dim() - 3))).expand(*index.shape, *x.shape[3:])
    return torch.gather(x, 2, expand)
