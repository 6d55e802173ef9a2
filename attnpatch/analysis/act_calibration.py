"""Choosing the heads `act` calibrates, on a small set of multiple-choice items.

ACT helps in some heads and hurts in others, so it keeps only the heads whose calibration helps.
`calibrate_act` measures that in two steps:
1. effect: with the model frozen, every query head mixes exact and calibrated attention with a
   strength s_h = 0; dL/ds_h (L: cross-entropy of the right choice among the choices, scored by
   summed log-likelihood as lm-eval's acc does) is the first-order change of the loss when head h
   alone is calibrated. One forward and backward pass per batch gives all heads at once.
2. search: the heads with negative effect, best first; the top 1, 2, 4, ... of them (and all) are
   calibrated for real and scored on the same items; the count with the lowest loss is kept.
`ActCalibration.config()` is the act PatchConfig with the chosen heads per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..config import PatchConfig
from ..errors import PatchError


def _choice_loss(loglik: torch.Tensor, label: int) -> torch.Tensor:
    """Cross-entropy of the right choice among the choices' summed log-likelihoods."""
    return -torch.log_softmax(loglik, 0)[label]


@dataclass
class ChoiceScores:
    """Per item: log-likelihood of each choice (summed over its tokens) and the choice's length in
    bytes (lm-eval's acc_norm divides by it)."""

    loglik: list[torch.Tensor]
    nbytes: list[torch.Tensor]
    labels: list[int]

    @property
    def loss(self) -> float:
        return float(torch.stack([_choice_loss(s.float(), y) for s, y in zip(self.loglik, self.labels)]).mean())

    @property
    def accuracy(self) -> float:
        return sum(int(s.argmax()) == y for s, y in zip(self.loglik, self.labels)) / len(self.labels)

    @property
    def accuracy_norm(self) -> float:
        return sum(int((s / n).argmax()) == y for s, n, y in zip(self.loglik, self.nbytes, self.labels)) / len(self.labels)

    def summary(self) -> dict:
        return {"loss": self.loss, "acc": self.accuracy, "acc_norm": self.accuracy_norm, "items": len(self.labels)}


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def choice_scores(model, tokenizer, items: list[dict], items_per_batch: int = 4, backward=None,
                  progress: bool = False) -> ChoiceScores:
    """Score multiple-choice items {"context", "choices", "label"} (the local task's format): each
    choice is the continuation " " + choice of the context. `backward(loss_of_batch)`, when given,
    is called per batch with the batch's share of the mean cross-entropy (for gradients)."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    loglik, nbytes, labels = [], [], []
    batches = range(0, len(items), items_per_batch)
    for start in tqdm(batches, desc="multiple choice", disable=not progress):
        chunk = items[start:start + items_per_batch]
        rows, spans = [], []
        for item in chunk:
            context = _encode(tokenizer, item["context"])
            for choice in item["choices"]:
                continuation = _encode(tokenizer, " " + choice)
                rows.append(context + continuation)
                spans.append((len(context), len(continuation)))
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = 1
        with torch.set_grad_enabled(backward is not None):
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            sums = []
            for i, (begin, length) in enumerate(spans):
                targets = ids[i, begin:begin + length].to(device)
                sums.append(logprobs[i, begin - 1:begin + length - 1].gather(-1, targets[:, None]).sum())
            per_item, offset = [], 0
            for item in chunk:
                count = len(item["choices"])
                per_item.append(torch.stack(sums[offset:offset + count]))
                offset += count
            if backward is not None:
                loss = torch.stack([_choice_loss(s, item["label"]) for s, item in zip(per_item, chunk)]).sum()
                backward(loss / len(items))
        loglik += [s.detach().cpu() for s in per_item]
        nbytes += [torch.tensor([len((" " + c).encode()) for c in item["choices"]], dtype=torch.float32) for item in chunk]
        labels += [int(item["label"]) for item in chunk]
    return ChoiceScores(loglik, nbytes, labels)


@dataclass
class ActCalibration:
    """effect[layer, query head]: first-order change of the calibration loss when only that head is
    calibrated (negative = helps); search: [{"heads", "loss", "acc", "acc_norm"}] for each count
    tried (0 = the unpatched model); best: the count with the lowest loss."""

    effect: torch.Tensor
    tower: str
    beta: float
    alpha: float
    search: list[dict] = field(default_factory=list)

    @property
    def ranked(self) -> list[tuple[int, int]]:
        """(layer, head) with negative effect, most helpful first."""
        flat = self.effect.flatten()
        order = torch.argsort(flat, stable=True).tolist()
        width = self.effect.shape[1]
        return [divmod(i, width) for i in order if flat[i] < 0]

    @property
    def best(self) -> int:
        if not self.search:
            raise PatchError("no search was run; pass a head count to config()")
        return min(self.search, key=lambda row: (row["loss"], row["heads"]))["heads"]

    def config(self, heads: int | None = None) -> PatchConfig:
        """act config calibrating the `heads` most helpful heads (default: the searched best)."""
        count = self.best if heads is None else heads
        ranked = self.ranked
        if not 0 < count <= len(ranked):
            raise PatchError(f"heads must be in 1..{len(ranked)} (the heads whose calibration lowers the loss); "
                             f"got {count}" + (" (the search found no count that beats the unpatched model)"
                                               if heads is None else ""))
        chosen: dict[int, list[int]] = {}
        for layer, head in ranked[:count]:
            chosen.setdefault(layer, []).append(head)
        return PatchConfig("act", params={"beta": self.beta, "alpha": self.alpha}, layers=sorted(chosen),
                           layer_params={layer: {"heads": sorted(h)} for layer, h in sorted(chosen.items())},
                           towers=[self.tower]).validated()

    def table(self) -> str:
        lines = ["| heads calibrated | loss | acc | acc_norm |", "|---|---|---|---|"]
        lines += [f"| {r['heads']} | {r['loss']:.4f} | {r['acc']:.3f} | {r['acc_norm']:.3f} |" for r in self.search]
        return "\n".join(lines)

    def plot(self, path):
        """Heat map of the per-head effect (layers x query heads)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(0.45 * self.effect.shape[1] + 2.5, 0.22 * self.effect.shape[0] + 1.8))
        bound = float(self.effect.abs().max()) or 1.0
        image = ax.imshow(self.effect.numpy(), aspect="auto", cmap="coolwarm", vmin=-bound, vmax=bound)
        ax.set_xlabel("query head")
        ax.set_ylabel("layer")
        ax.set_title(f"act: dLoss/d(calibration) per head (beta={self.beta}, alpha={self.alpha})\nblue = helps", fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def _ladder(available: int, counts) -> list[int]:
    if counts is None:
        counts, c = [], 1
        while c < available:
            counts.append(c)
            c *= 2
        counts.append(available)
    return sorted({c for c in counts if 0 < c <= available})


def calibrate_act(model, tokenizer, items: list[dict], beta: float = 0.4, alpha: float = 5.0, counts=None,
                  towers: list[str] | None = None, items_per_batch: int = 4, progress: bool = True) -> ActCalibration:
    """Per-head effect of ACT on the items' choice loss, then a search over how many of the helpful
    heads to keep (module docstring). `counts`: head counts to try (default 1, 2, 4, ... and all
    helpful heads). The model must be unpatched; it is left unpatched."""
    from ..api import is_patched, patch_model, patched_methods, unpatch_model

    if is_patched(model):
        raise PatchError("calibrate_act needs an unpatched model (it patches act while measuring)")
    if not items:
        raise PatchError("items is empty; give multiple-choice items {'context', 'choices', 'label'}")
    was_training = model.training
    model.eval()
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    try:
        base = choice_scores(model, tokenizer, items, items_per_batch, progress=progress)
        patch_model(model, PatchConfig("act", {"beta": beta, "alpha": alpha}, towers=towers))
        methods = patched_methods(model)
        tower = methods[0].site.tower
        if any(m.site.tower != tower for m in methods):
            raise PatchError(f"calibrate_act scores one stack of layers; pick one with towers= (found "
                             f"{sorted({m.site.tower for m in methods})})")
        for p, _ in frozen:
            p.requires_grad_(False)
        device = next(model.parameters()).device
        strength = torch.zeros(len(methods), max(m.site.num_heads for m in methods), device=device, requires_grad=True)
        for i, method in enumerate(methods):
            method.strength = strength[i, :method.site.num_heads]
        choice_scores(model, tokenizer, items, items_per_batch, backward=lambda loss: loss.backward(), progress=progress)
        unpatch_model(model)  # the patched methods, and the strengths they hold, go with it
        calibration = ActCalibration(strength.grad.detach().cpu().clone(), tower, beta, alpha)
        calibration.search.append({"heads": 0, **base.summary()})
        for count in tqdm(_ladder(len(calibration.ranked), counts), desc="act head search", disable=not progress):
            patch_model(model, calibration.config(count))
            calibration.search.append({"heads": count, **choice_scores(model, tokenizer, items, items_per_batch).summary()})
            unpatch_model(model)
    finally:
        if is_patched(model):  # an error midway: leave the model as it came
            unpatch_model(model)
        for p, flag in frozen:
            p.requires_grad_(flag)
        model.train(was_training)
    return calibration
