"""Vision before-vs-after: ViT top-1 agreement (and accuracy), CLIP zero-shot agreement and
embedding cosine, DiT output error (MSE, PSNR) for fixed noise and timesteps, or (with a step
count) the latent a DDIM trajectory ends in (PSNR, SSIM) and images per second.

Each metric has an `*_outputs(model, inputs)` that runs the model as it is, and a comparison of
patched outputs with the dense model's outputs from the same run.
"""

from __future__ import annotations

import math
import time

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


@torch.no_grad()
def dit_sample(model, sample: torch.Tensor, steps: int, **conditioning) -> dict:
    """A DDIM trajectory of `steps` steps (1000 training timesteps) from the noise `sample`, the
    model predicting the noise (its first in_channels outputs, as DiT's learned-sigma head gives):
    the final latents (B, C, H, W) and the images per second it ran at."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(steps)
    model(sample, timestep=scheduler.timesteps[:1].expand(len(sample)), **conditioning)  # warm-up, not timed
    latents, start = sample.clone(), time.perf_counter()
    for t in scheduler.timesteps:
        noise = model(latents, timestep=t.expand(len(latents)), **conditioning).sample[:, : latents.shape[1]]
        latents = scheduler.step(noise, t, latents).prev_sample
    seconds = time.perf_counter() - start
    return {"latents": latents.float(), "images_per_second": len(latents) / seconds}


def ssim(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Mean structural similarity of (B, C, H, W) maps per channel (Gaussian window 11, sigma 1.5,
    smaller for small maps; the dynamic range is the reference's)."""
    size = min(11, reference.shape[-1], reference.shape[-2])
    size -= 1 - size % 2
    coords = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-coords ** 2 / (2 * 1.5 ** 2))
    window = (g[:, None] * g[None, :] / g.sum() ** 2).to(reference.dtype)
    channels = reference.shape[1]
    kernel = window.expand(channels, 1, size, size)

    def blur(x):
        return torch.nn.functional.conv2d(x, kernel, groups=channels)

    span = float(reference.max() - reference.min()) or 1.0
    c1, c2 = (0.01 * span) ** 2, (0.03 * span) ** 2
    mu_x, mu_y = blur(reference), blur(other)
    var_x = blur(reference * reference) - mu_x ** 2
    var_y = blur(other * other) - mu_y ** 2
    cov = blur(reference * other) - mu_x * mu_y
    value = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return float(value.mean())


def compare_dit_samples(dense: dict, patched: dict) -> dict:
    result = compare_dit(dense["latents"], patched["latents"])
    result["ssim"] = ssim(dense["latents"], patched["latents"])
    result["images_per_second"] = patched["images_per_second"]
    result["speedup_vs_dense"] = patched["images_per_second"] / dense["images_per_second"]
    return result


def llava_prompt_inputs(model, images: torch.Tensor | None = None, prompt_ids: torch.Tensor | None = None,
                        batch: int = 4, text_tokens: int = 32, seed: int = 0) -> dict:
    """Inputs of a Llava-style VLM: pixel_values (given, or seeded noise at the tower's size) and
    input_ids with one image's placeholder run after `prompt_ids` (given, or seeded token ids)."""
    cfg = model.config
    vision = cfg.vision_config
    g = torch.Generator().manual_seed(seed)
    if images is None:
        images = torch.randn(batch, 3, vision.image_size, vision.image_size, generator=g)
    count = images.shape[0]
    if prompt_ids is None:
        vocab = cfg.text_config.vocab_size
        prompt_ids = torch.randint(3, vocab, (count, text_tokens), generator=g)
        prompt_ids[prompt_ids == cfg.image_token_id] = 3
    patches = (vision.image_size // vision.patch_size) ** 2 + (cfg.vision_feature_select_strategy == "full")
    placeholders = torch.full((count, patches), cfg.image_token_id)
    head = prompt_ids.shape[1] // 4  # a short system prefix, the image, then the question
    ids = torch.cat([prompt_ids[:, :head], placeholders, prompt_ids[:, head:]], dim=1)
    return {"input_ids": ids, "pixel_values": images}


@torch.no_grad()
def llava_outputs(model, inputs: dict, new_tokens: int = 8, repeats: int = 3) -> dict:
    """Last-position logits, the tokens the language model saw, best-of-`repeats` prefill time, and
    `new_tokens` greedy tokens."""
    import time

    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = model(**inputs)
        seconds.append(time.perf_counter() - start)
    generated = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens)
    return {"logits": out.logits[:, -1].float(), "lm_tokens": out.logits.shape[1], "prefill_seconds": min(seconds),
            "new_tokens": generated[:, -new_tokens:]}


def compare_llava(dense: dict, patched: dict) -> dict:
    """Agreement of a patched VLM with the dense one: next-token top-1 and logit cosine at the last
    prompt position, the share of greedy new tokens equal position by position, and prefill time."""
    cos = torch.nn.functional.cosine_similarity
    return {
        "lm_tokens": patched["lm_tokens"],
        "prefill_seconds": patched["prefill_seconds"],
        "prefill_speedup": dense["prefill_seconds"] / patched["prefill_seconds"],
        "next_token_agreement": float((patched["logits"].argmax(-1) == dense["logits"].argmax(-1)).float().mean()),
        "logit_cosine": float(cos(patched["logits"], dense["logits"], dim=-1).mean()),
        "greedy_token_agreement": float((patched["new_tokens"] == dense["new_tokens"]).float().mean()),
    }
