"""Vision before-vs-after: ViT top-1 agreement (and accuracy), CLIP zero-shot agreement and
embedding cosine, DiT output error (MSE, PSNR) for fixed noise and timesteps.

Each metric has an `*_outputs(model, inputs)` that runs the model as it is, and a comparison of
patched outputs with the dense model's outputs from the same run.
"""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def classifier_outputs(model, pixel_values: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Logits of an image classifier (e.g. ViTForImageClassification)."""
    logits = [model(pixel_values=pixel_values[i : i + batch_size]).logits for i in range(0, len(pixel_values), batch_size)]
    return torch.cat(logits).float()


def compare_classifier(dense_logits, logits, labels: torch.Tensor | None = None) -> dict:
    result = {"top1_agreement": float((logits.argmax(-1) == dense_logits.argmax(-1)).float().mean())}
    if labels is not None:
        result["accuracy"] = float((logits.argmax(-1) == labels).float().mean())
        result["dense_accuracy"] = float((dense_logits.argmax(-1) == labels).float().mean())
    return result


@torch.no_grad()
def clip_outputs(model, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask=None) -> dict:
    """Zero-shot logits (images x class prompts) and normalised image/text embeddings."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)
    return {"logits": out.logits_per_image.float(), "image_embeds": out.image_embeds.float(),
            "text_embeds": out.text_embeds.float()}


def compare_clip(dense: dict, patched: dict, labels: torch.Tensor | None = None) -> dict:
    cos = torch.nn.functional.cosine_similarity
    result = {
        "zero_shot_agreement": float((patched["logits"].argmax(-1) == dense["logits"].argmax(-1)).float().mean()),
        "image_embedding_cosine": float(cos(patched["image_embeds"], dense["image_embeds"], dim=-1).mean()),
        "text_embedding_cosine": float(cos(patched["text_embeds"], dense["text_embeds"], dim=-1).mean()),
    }
    if labels is not None:
        result["zero_shot_accuracy"] = float((patched["logits"].argmax(-1) == labels).float().mean())
    return result


@torch.no_grad()
def dit_outputs(model, sample: torch.Tensor, timesteps: torch.Tensor, **conditioning) -> torch.Tensor:
    """One denoiser evaluation per timestep on fixed noise; returns the stacked outputs."""
    outs = [model(sample, timestep=t.expand(sample.shape[0]), **conditioning).sample for t in timesteps]
    return torch.stack(outs).float()


def compare_dit(dense: torch.Tensor, patched: torch.Tensor) -> dict:
    mse = float(((patched - dense) ** 2).mean())
    peak = float(dense.abs().max()) ** 2  # signal range of the dense output
    return {"mse": mse, "psnr_db": float("inf") if mse == 0 else 10 * math.log10(peak / mse)}
