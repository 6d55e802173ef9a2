"""token_merge and attention_reuse on vision encoders and diffusion transformers: speed against
dense SDPA and against the attention-free floor (same run), and agreement with the dense model.

    python eval/benchmarks/tokens_vision_diffusion.py --out eval/results/tokens-vision-diffusion

Models have the geometry of real checkpoints and random weights (no hub here):
- vit: ViT-B/16 at 224 (197 tokens, 12 layers), a 1000-class head; 16 seeded noise images, batch 8.
  Agreement: top-1 of the head and cosine of the final [CLS] state with the dense model's.
- clip: CLIP ViT-B/16 (image tower as vit; text tower 12 x 512) with 4 random 8-token prompts;
  zero-shot agreement and image-embedding cosine; speed of the image tower.
- dit: DiT-S/2 at 256 (256 tokens, 12 layers), class-conditional; 20 DDIM steps from fixed noise,
  batch 2; PSNR / SSIM of the final latents against dense, images per second.
- pixart: PixArt-alpha's block geometry (1152 wide, 16 heads, self- and cross-attention to 120
  caption tokens) at 512 px (1024 tokens), 4 of its 28 blocks; 10 DDIM steps, batch 1.
- pixart1024: the same at 1024 px (4096 tokens), 2 blocks (every block costs the same, so the
  ratios are the full model's up to the embedding and the final layer).
Random weights: speed is what a trained model of that geometry gets; agreement is how far each
setting moves a random model (whose tokens are less alike than a trained model's, so merging costs
more here), not the quality on real images; the grid pictures show the final latents (first three
channels), not decoded images. Commands for real checkpoints are in the README.
Writes results.json, report.md and grid_<model>.png.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import torch

from attnpatch import patch_model, patched_methods, unpatch_model
from attnpatch.analysis.reuse_calibration import calibrate_reuse
from attnpatch.evaluation.floor import attention_free
from attnpatch.evaluation.report import environment
from attnpatch.evaluation.speed import best_seconds
from attnpatch.evaluation.vision import compare_dit_samples, dit_sample

MODELS = ["vit", "clip", "dit", "pixart", "pixart1024"]
MERGE_VIT = [("token_merge r=4", {"r": 4}), ("token_merge r=8 (~50% gone by the last layer)", {"r": 8}),
             ("token_merge r=13 (ToMe's off-the-shelf ViT-B/16 setting)", {"r": 13}), ("token_merge r=16", {"r": 16}),
             ("token_merge r=8 prune", {"r": 8, "mode": "prune"})]
DIFFUSION = [("token_merge 0.5 (ToMeSD default)", "token_merge", {"ratio": 0.5}),
             ("token_merge 0.75", "token_merge", {"ratio": 0.75}),
             ("token_merge 0.5 prune", "token_merge", {"ratio": 0.5, "mode": "prune"}),
             ("attention_reuse PAB ranges", "attention_reuse", {}),
             ("attention_reuse self 2", "attention_reuse", {"self_reuse": 2}),
             ("attention_reuse calibrated", "attention_reuse", "calibrate")]


def build(kind: str, quick: bool):
    torch.manual_seed(0)
    if kind == "vit":
        from transformers import ViTConfig, ViTForImageClassification
        small = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, image_size=64,
                     patch_size=8) if quick else {}
        return ViTForImageClassification(ViTConfig(num_labels=1000, attn_implementation="sdpa", **small))
    if kind == "clip":
        from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig
        small = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128) if quick else {}
        vision = CLIPVisionConfig(patch_size=16 if not quick else 8, image_size=224 if not quick else 64, **small)
        return CLIPModel(CLIPConfig(text_config=CLIPTextConfig(**small).to_dict(), vision_config=vision.to_dict(),
                                    attn_implementation="sdpa"))
    if kind == "dit":
        from diffusers import DiTTransformer2DModel
        return DiTTransformer2DModel(num_attention_heads=2 if quick else 6, attention_head_dim=16 if quick else 64,
                                     in_channels=4, out_channels=8, num_layers=2 if quick else 12,
                                     sample_size=8 if quick else 32, patch_size=2, num_embeds_ada_norm=1000)
    from diffusers import PixArtTransformer2DModel
    large = kind == "pixart1024"  # PixArt-alpha 1024 px: 4096 tokens, 2 of its 28 blocks (all blocks cost the same)
    return PixArtTransformer2DModel(num_attention_heads=2 if quick else 16, attention_head_dim=16 if quick else 72,
                                    in_channels=4, out_channels=8, num_layers=2 if quick or large else 4,
                                    sample_size=8 if quick else 128 if large else 64, patch_size=2,
                                    cross_attention_dim=32 if quick else 1152, caption_channels=24 if quick else 4096,
                                    use_additional_conditions=False)


def inputs(kind: str, model):
    g = torch.Generator().manual_seed(1)
    if kind in ("vit", "clip"):
        cfg = getattr(model.config, "vision_config", model.config)
        pixels = torch.randn(16, 3, cfg.image_size, cfg.image_size, generator=g)
        if kind == "vit":
            return {"pixel_values": pixels}
        text = model.config.text_config
        ids = torch.randint(1, text.vocab_size - 2, (4, 8), generator=g)
        ids[:, -1] = text.eos_token_id
        return {"pixel_values": pixels, "input_ids": ids}
    cfg = model.config
    batch = 2 if kind == "dit" else 1
    found = {"sample": torch.randn(batch, 4, cfg.sample_size, cfg.sample_size, generator=g),
             "steps": 20 if kind == "dit" else 10}
    if kind == "dit":
        found["conditioning"] = {"class_labels": torch.arange(batch) + 1}
    else:
        found["conditioning"] = {"encoder_hidden_states": torch.randn(batch, 120, cfg.caption_channels, generator=g),
                                 "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    return found


@torch.no_grad()
def encoder_run(kind, model, data):
    """(outputs to compare, a timed callable): vit all 16 images in batches of 8; clip the image tower."""
    pixels = data["pixel_values"]
    if kind == "vit":
        def forward():
            return [model(pixel_values=pixels[i:i + 8], output_hidden_states=True) for i in range(0, len(pixels), 8)]
        outs = forward()
        return {"logits": torch.cat([o.logits for o in outs]),
                "cls": torch.cat([o.hidden_states[-1][:, 0] for o in outs])}, forward
    out = model(input_ids=data["input_ids"], pixel_values=pixels)
    return ({"logits": out.logits_per_image, "cls": out.image_embeds},
            lambda: [model.get_image_features(pixel_values=pixels[i:i + 8]) for i in range(0, len(pixels), 8)])


def encoder_agreement(dense, out) -> dict:
    cosine = torch.nn.functional.cosine_similarity(out["cls"], dense["cls"], dim=-1).mean()
    return {"top1_agreement": float((out["logits"].argmax(-1) == dense["logits"].argmax(-1)).float().mean()),
            "embedding_cosine": float(cosine)}


@contextlib.contextmanager
def diffusers_floor():
    """Every diffusers attention returns its value (attention costs nothing): the floor of a DiT."""
    from diffusers.models import attention_processor

    original = attention_processor.F

    class Free:
        def __getattr__(self, name):
            return getattr(original, name)

        @staticmethod
        def scaled_dot_product_attention(query, key, value, *args, **kwargs):
            if key.shape[-2] == query.shape[-2]:
                return value
            return value.mean(-2, keepdim=True).expand(*query.shape[:-1], value.shape[-1])  # cross: any cheap map

    attention_processor.F = Free()
    try:
        yield
    finally:
        attention_processor.F = original


def rows_for(kind: str, quick: bool, repeats: int, out: Path) -> list[dict]:
    model = build(kind, quick).eval()
    data = inputs(kind, model)
    rows = []
    if kind in ("vit", "clip"):
        dense, forward = encoder_run(kind, model, data)
        timings = {"dense": best_seconds(forward, repeats)}
        with attention_free(model):
            timings["floor"] = best_seconds(forward, repeats)
        settings = MERGE_VIT if kind == "vit" else MERGE_VIT[1:4]
        for label, params in settings:
            patch_model(model, "token_merge", **params)
            got, forward = encoder_run(kind, model, data)
            seconds = best_seconds(forward, repeats)
            tokens = _final_tokens(model, kind, data)
            unpatch_model(model)
            rows.append({"model": kind, "setting": label, "seconds": seconds, "final_tokens": tokens,
                         **encoder_agreement(dense, got)})
            print(rows[-1], flush=True)
        timings["dense_again"] = best_seconds(encoder_run(kind, model, data)[1], repeats)
    else:
        sample, steps, conditioning = data["sample"], data["steps"], data["conditioning"]
        run = lambda: dit_sample(model, sample, steps, **conditioning)  # noqa: E731
        dense = run()
        with diffusers_floor():
            floor = run()
        timings = {"dense": len(sample) / dense["images_per_second"], "floor": len(sample) / floor["images_per_second"]}
        latents = {"dense": dense["latents"]}
        for label, method, params in DIFFUSION:
            cross = method == "attention_reuse"
            if params == "calibrate":
                patch_model(model, method, include_cross_attention=cross)
                chosen = calibrate_reuse(model, run, threshold=0.05)["layer_params"]
                unpatch_model(model)
                patch_model(model, method, include_cross_attention=cross, layer_params=chosen)
                params = {"layer_params": {str(k): v for k, v in chosen.items()}}
            else:
                patch_model(model, method, include_cross_attention=cross, **params)
            got = run()
            reused = sum(getattr(m, "reused", 0) for m in patched_methods(model))
            unpatch_model(model)
            latents[label] = got["latents"]
            compared = compare_dit_samples(dense, got)
            rows.append({"model": kind, "setting": label, "params": params, "seconds": len(sample) / got["images_per_second"],
                         "psnr_db": compared["psnr_db"], "ssim": compared["ssim"], "reused_module_calls": reused})
            print(rows[-1], flush=True)
        timings["dense_again"] = len(sample) / run()["images_per_second"]
        picture_grid(latents, out / f"grid_{kind}.png", kind)
    dense_seconds = min(timings["dense"], timings["dense_again"])
    for row in rows:
        row.update(dense_seconds=dense_seconds, floor_seconds=timings["floor"],
                   x_dense=dense_seconds / row["seconds"], x_floor=timings["floor"] / row["seconds"])
    rows.insert(0, {"model": kind, "setting": "dense SDPA", "seconds": dense_seconds, "x_dense": 1.0,
                    "x_floor": timings["floor"] / dense_seconds, "floor_seconds": timings["floor"]})
    return rows


@torch.no_grad()
def _final_tokens(model, kind, data) -> int:
    pixels = data["pixel_values"][:1]
    tower = model.vit if kind == "vit" else model.vision_model
    return int(tower(pixel_values=pixels).last_hidden_state.shape[1])


def picture_grid(latents: dict, path: Path, kind: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = latents["dense"][0, :3]
    low, high = float(dense.min()), float(dense.max())
    labels = list(latents)
    fig, axes = plt.subplots(2, len(labels), figsize=(2.2 * len(labels), 4.6))
    for column, label in enumerate(labels):
        image = latents[label][0, :3]
        axes[0, column].imshow(((image - low) / (high - low)).clamp(0, 1).permute(1, 2, 0).numpy())
        axes[1, column].imshow((image - dense).abs().mean(0).numpy(), cmap="magma", vmin=0, vmax=(high - low) / 4)
        axes[0, column].set_title(label.replace(" (", "\n("), fontsize=7)
        for row in axes[:, column]:
            row.set_xticks([]), row.set_yticks([])
    axes[0, 0].set_ylabel("final latent (ch 0-2)", fontsize=7)
    axes[1, 0].set_ylabel("|difference| from dense", fontsize=7)
    fig.suptitle(f"{kind}: same seed and noise, random weights", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(rows: list[dict], quick: bool) -> str:
    lines = ["# token_merge and attention_reuse on vision and diffusion models", "",
             "Random weights with real geometries" + (" (--quick: tiny geometries)" if quick else "") +
             "; see eval/benchmarks/tokens_vision_diffusion.py. x dense / x floor: speed relative to dense SDPA and to the "
             "attention-free floor, measured in the same run.", ""]
    for kind in dict.fromkeys(r["model"] for r in rows):
        encoder = kind in ("vit", "clip")
        quality = "top-1 agreement | embedding cosine | final tokens" if encoder else "PSNR dB | SSIM | reused calls"
        lines += [f"## {kind}", "", f"| setting | seconds | x dense | x floor | {quality} |", "|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if r["model"] == kind):
            if r["setting"] == "dense SDPA":
                values = "1 | 1 | -" if encoder else "inf | 1 | 0"
            elif encoder:
                values = f"{r['top1_agreement']:.3f} | {r['embedding_cosine']:.3f} | {r['final_tokens']}"
            else:
                values = f"{r['psnr_db']:.1f} | {r['ssim']:.3f} | {r['reused_module_calls']}"
            lines.append(f"| {r['setting']} | {r['seconds']:.3f} | {r['x_dense']:.2f}x | {r['x_floor']:.2f}x | {values} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="eval/results/tokens-vision-diffusion")
    parser.add_argument("--models", nargs="+", default=MODELS[:4], choices=MODELS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny geometries (a smoke run)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [row for kind in args.models for row in rows_for(kind, args.quick, args.repeats, out)]
    earlier = out / "results.json"
    if earlier.exists():  # models not measured this time keep their earlier rows
        kept = [r for r in json.loads(earlier.read_text())["rows"] if r["model"] not in args.models]
        rows = sorted(kept + rows, key=lambda r: MODELS.index(r["model"]))
    (out / "results.json").write_text(json.dumps({"environment": environment(0), "quick": args.quick, "rows": rows},
                                                 indent=2, default=float) + "\n")
    (out / "report.md").write_text(markdown(rows, args.quick))
    print(markdown(rows, args.quick))


if __name__ == "__main__":
    main()
