"""Token merging by bipartite soft matching (ToMe; ToMeSD's destinations), with no model knowledge.

Tokens split into candidate sources (A) and destinations (B); each source's most similar
destination (cosine of the metric) is its edge, and the `r` sources with the strongest edges merge
into their destinations. A merge is a `TokenMerge`: `target` (B, N) maps every token to its row in
the merged sequence (kept tokens in their original order, so [CLS] and registers stay first), which
makes merging a weighted scatter-add and unmerging a gather. Protected tokens are never sources nor
destinations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenMerge:
    target: torch.Tensor  # (B, N) long: each token's row in the merged sequence
    kept: torch.Tensor  # (B, N - r) long: the tokens that stay, ascending
    length: int  # N - r

    def merge(self, x: torch.Tensor, sizes: torch.Tensor | None = None, mode: str = "merge"):
        """(B, N, C) -> (B, N - r, C) and the merged sizes (B, N - r): each merged row is the
        size-weighted mean of its tokens (mode="prune": the sources are dropped instead)."""
        b, n, c = x.shape
        sizes = x.new_ones(b, n) if sizes is None else sizes.to(x.dtype)
        if mode == "prune":
            rows = self.kept.to(x.device)
            return x.gather(1, rows[..., None].expand(-1, -1, c)), sizes.gather(1, rows)
        target = self.target.to(x.device)
        total = x.new_zeros(b, self.length).scatter_add_(1, target, sizes)
        summed = x.new_zeros(b, self.length, c).scatter_add_(1, target[..., None].expand(-1, -1, c), x * sizes[..., None])
        return summed / total[..., None], total

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """(B, N - r, C) -> (B, N, C): every token takes its merged row's value."""
        return y.gather(1, self.target.to(y.device)[..., None].expand(-1, -1, y.shape[-1]))


def alternate_destinations(tokens: int, protected: int, device=None) -> torch.Tensor:
    """ToMe's split: after the `protected` first tokens, every second token is a destination."""
    destinations = torch.zeros(tokens, dtype=torch.bool, device=device)
    destinations[protected + 1::2] = True
    return destinations


def grid_destinations(height: int, width: int, stride: tuple[int, int] = (2, 2), generator=None,
                      randomise: bool = True, device=None) -> torch.Tensor:
    """ToMeSD's split of a (height x width) token grid: one destination per stride tile, chosen at
    random (or the tile's first token), the rest candidate sources. Row-major (N,) bool."""
    sy, sx = stride
    tiles_y, tiles_x = -(-height // sy), -(-width // sx)
    if randomise:
        pick = torch.randint(sy * sx, (tiles_y, tiles_x), generator=generator)
    else:
        pick = torch.zeros(tiles_y, tiles_x, dtype=torch.long)
    rows = torch.arange(tiles_y)[:, None] * sy + pick // sx
    cols = torch.arange(tiles_x)[None, :] * sx + pick % sx
    inside = (rows < height) & (cols < width)  # a ragged edge tile may pick outside the grid: no destination there
    destinations = torch.zeros(height, width, dtype=torch.bool)
    destinations[rows[inside], cols[inside]] = True
    return destinations.flatten().to(device)


def bipartite_merge(metric: torch.Tensor, r: int, destinations: torch.Tensor, protected: int = 0) -> TokenMerge:
    """Match (B, N, C) `metric` tokens: the r candidate sources (not destinations, not among the
    first `protected`) with the highest cosine to their best destination merge into it. r is
    clamped to the number of candidates."""
    b, n, _ = metric.shape
    device = metric.device
    destinations = destinations.to(device)
    candidate = ~destinations
    candidate[:protected] = False
    sources_all, dest_all = candidate.nonzero().squeeze(-1), destinations.nonzero().squeeze(-1)
    r = max(0, min(int(r), len(sources_all), n - protected - 1))
    if r == 0 or len(dest_all) == 0:
        keep = torch.arange(n, device=device).expand(b, n)
        return TokenMerge(target=keep.clone(), kept=keep.clone(), length=n)
    unit = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    scores = unit[:, sources_all] @ unit[:, dest_all].transpose(1, 2)  # (B, A, B)
    best, choice = scores.max(dim=-1)
    strongest = best.argsort(dim=-1, descending=True)[:, :r]
    merged_sources = sources_all[strongest]  # (B, r) token indices
    merged_into = dest_all[choice.gather(1, strongest)]  # (B, r)
    keep = torch.ones(b, n, dtype=torch.bool, device=device)
    keep.scatter_(1, merged_sources, False)
    position = keep.long().cumsum(-1) - 1  # row in the merged sequence of each kept token
    target = position.scatter(1, merged_sources, position.gather(1, merged_into))
    kept = keep.nonzero()[:, 1].view(b, n - r)
    return TokenMerge(target=target, kept=kept, length=n - r)
