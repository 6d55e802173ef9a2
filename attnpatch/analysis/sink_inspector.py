"""Sink inspector: where attention mass piles up and which hidden dimensions carry massive
activations, per layer and head, on the text or images you give.

- first-token mass: mean attention weight each head puts on key 0 (the BOS / [CLS] token),
  averaged over every query that can see more than that one key;
- other sinks: the mass each head puts on the `top_tokens` other keys that receive the most
  attention in the example (key columns summed over queries), i.e. sinks that are not the first
  token; their positions are reported for the first example (sinks depend on the content);
- massive activations: per layer output, the hidden dimensions with the largest magnitude, their
  value against the median magnitude of that layer, and the token positions that carry them.
Attention is read from exact softmax attention computed while the model runs (patched for the
duration when the model is not patched already); nothing is trained or changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..errors import PatchError
from ..runtime.exact import exact_attention_weights
from .observing import model_inputs, observed, pick_tower, self_attention_sites


@dataclass
class SinkReport:
    """first_token[tower] and other_sinks[tower]: (layers, query heads) mean attention mass;
    massive[tower]: one dict per layer output (dims, values, ratio to the median magnitude,
    positions); examples: how many sequences were seen."""

    first_token: dict[str, torch.Tensor]
    other_sinks: dict[str, torch.Tensor]
    massive: dict[str, list[dict]] = field(default_factory=dict)
    sink_positions: dict[str, list[list[int]]] = field(default_factory=dict)  # other sinks of the first example
    examples: int = 0

    @property
    def towers(self) -> list[str]:
        return sorted(self.first_token)

    def table(self, tower: str | None = None) -> str:
        tower = self._tower(tower)
        first, other = self.first_token[tower], self.other_sinks[tower]
        massive = self.massive.get(tower, [])
        lines = ["| layer | first-token mass (mean / max head) | other-sink mass (mean / max head) | other sinks in example 0 "
                 "| massive dim | magnitude | x median |", "|---|---|---|---|---|---|---|"]
        for layer in range(first.shape[0]):
            row = massive[layer] if layer < len(massive) else None
            act = (f"{row['dims'][0]} | {row['values'][0]:.3g} | {row['ratio']:.0f}" if row else " | | ")
            positions = ", ".join(str(p) for p in self.sink_positions.get(tower, [[]] * first.shape[0])[layer])
            lines.append(f"| {layer} | {first[layer].nanmean():.3f} / {first[layer].nan_to_num(-1).max():.3f} | "
                         f"{other[layer].nanmean():.3f} / {other[layer].nan_to_num(-1).max():.3f} | {positions} | "
                         f"{act} |")
        return "\n".join(lines)

    def plot(self, path, tower: str | None = None):
        """First-token mass per layer and head (heat map) and the largest hidden magnitude per layer."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        tower = self._tower(tower)
        fig, axes = plt.subplots(1, 3, figsize=(13, 0.2 * self.first_token[tower].shape[0] + 3))
        for ax, (title, values) in zip(axes[:2], (("attention on the first token", self.first_token[tower]),
                                                  ("attention on other sinks", self.other_sinks[tower]))):
            image = ax.imshow(values.numpy(), aspect="auto", cmap="magma", vmin=0, vmax=1)
            ax.set_title(title)
            ax.set_xlabel("query head")
            ax.set_ylabel("layer")
            fig.colorbar(image, ax=ax, shrink=0.8)
        massive = self.massive.get(tower, [])
        if massive:
            axes[2].plot([row["values"][0] for row in massive], marker="o", label="largest |activation|")
            axes[2].plot([row["median"] for row in massive], marker=".", label="median |activation|")
            axes[2].set_yscale("log")
            axes[2].set_xlabel("layer output")
            axes[2].set_title("massive activations")
            axes[2].legend()
        fig.suptitle(f"attention sinks, {tower} ({self.examples} examples)")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def _tower(self, tower: str | None) -> str:
        return pick_tower(self.towers, tower)


class _SinkProbe:
    def __init__(self, sites, top_tokens: int):
        self.sites = {id(s.module): s for s in sites}
        self.top_tokens = top_tokens
        self.first = {key: 0.0 for key in self.sites}
        self.other = {key: 0.0 for key in self.sites}
        self.positions: dict[int, list[int]] = {}  # the first example's other sinks, per module

    @torch.no_grad()
    def __call__(self, call, out):
        key = id(call.module)
        if key not in self.sites:
            return out
        weights = exact_attention_weights(call)  # (B, Hq, Lq, Lk)
        lq, lk = weights.shape[-2:]
        # queries that see more than key 0 (under causality query 0 sees only itself)
        seen = (weights > 0).sum(-1) > 1  # (B, Hq, Lq)
        rows = seen.float() / seen.float().sum(-1, keepdim=True).clamp_min(1)
        self.first[key] = self.first[key] + (weights[..., 0] * rows).sum(-1).sum(0)
        if lk > 1 and self.top_tokens:
            columns = (weights[..., 1:] * rows[..., None]).sum(-2)  # (B, Hq, Lk - 1): mean mass per key
            per_example = columns.mean(1)  # (B, Lk - 1) over heads
            top = per_example.topk(min(self.top_tokens, lk - 1), dim=-1).indices  # (B, k)
            mass = torch.gather(columns, -1, top[:, None, :].expand(-1, columns.shape[1], -1)).sum(-1)
            self.other[key] = self.other[key] + mass.sum(0)
            self.positions.setdefault(key, sorted((top[0] + 1).tolist()))
        return out


def _massive(hidden: torch.Tensor, valid: torch.Tensor | None, top_dims: int) -> dict:
    magnitude = hidden.detach().float().abs()
    if valid is not None and valid.shape == magnitude.shape[:2]:
        magnitude = magnitude * valid[..., None].to(magnitude)
    per_dim = magnitude.amax(dim=(0, 1))
    values, dims = per_dim.topk(min(top_dims, per_dim.numel()))
    median = float(magnitude.median())
    flat = magnitude[..., dims[0]].flatten()
    positions = (flat.topk(min(3, flat.numel())).indices % magnitude.shape[1]).tolist()
    return {"dims": dims.tolist(), "values": values.tolist(), "median": median,
            "ratio": float(values[0]) / max(median, 1e-12), "positions": sorted(set(positions))}


def inspect_sinks(model, batches, top_tokens: int = 3, top_dims: int = 3, towers: list[str] | str | None = None,
                  progress: bool = True) -> SinkReport:
    """Attention-sink statistics and massive activations of `model` on `batches` (dicts of model
    inputs, or input_ids tensors); see the module docstring."""
    sites = self_attention_sites(model, towers)
    probe = _SinkProbe(sites, top_tokens)
    device = next(model.parameters()).device
    hidden_by_tower: dict[str, list[list[dict]]] = {}
    examples = 0
    with observed(model, sites, probe), torch.no_grad():
        for batch in tqdm(list(batches), desc="sink inspector", disable=not progress):
            batch = model_inputs(batch, device)
            output = model(**batch, output_hidden_states=True)
            examples += next(v for v in batch.values() if isinstance(v, torch.Tensor)).shape[0]
            for tower, states in _hidden_states(output, sites).items():
                valid = None if "vision" in tower else batch.get("attention_mask")  # text padding
                rows = [_massive(h, valid, top_dims) for h in states[1:]]  # layer outputs
                hidden_by_tower.setdefault(tower, []).append(rows)
    if examples == 0:
        raise PatchError("batches is empty; give at least one batch")
    return _report(probe, sites, examples, hidden_by_tower)


def _hidden_states(output, sites) -> dict[str, tuple]:
    """Hidden states per tower: the output's own for single-stack models, the text/vision model
    outputs of CLIP-style models."""
    towers = sorted({s.tower for s in sites})
    found = {}
    for tower in towers:
        for name in ("text_model_output", "vision_model_output"):
            sub = getattr(output, name, None)
            if sub is not None and name.split("_")[0] in tower and getattr(sub, "hidden_states", None) is not None:
                found[tower] = sub.hidden_states
        if tower not in found and len(towers) == 1 and getattr(output, "hidden_states", None) is not None:
            found[tower] = output.hidden_states
    return found


def _report(probe: _SinkProbe, sites, examples: int, hidden_by_tower) -> SinkReport:
    first, other, positions, massive = {}, {}, {}, {}
    for tower in sorted({s.tower for s in sites}):
        tower_sites = [s for s in sites if s.tower == tower]
        depth, width = tower_sites[0].num_layers, max(s.num_heads for s in tower_sites)
        first[tower] = torch.full((depth, width), float("nan"))
        other[tower] = torch.full((depth, width), float("nan"))
        positions[tower] = [[] for _ in range(depth)]
        for site in tower_sites:
            key = id(site.module)
            for table, sums in ((first[tower], probe.first[key]), (other[tower], probe.other[key])):
                if isinstance(sums, torch.Tensor):
                    table[site.layer, : site.num_heads] = sums.cpu().float() / examples
            positions[tower][site.layer] = probe.positions.get(key, [])
        batches = hidden_by_tower.get(tower)
        if batches:  # the batch whose layer output had the largest activation speaks for the layer
            massive[tower] = [max((b[layer] for b in batches), key=lambda row: row["values"][0])
                              for layer in range(len(batches[0]))]
    return SinkReport(first, other, massive, positions, examples)
