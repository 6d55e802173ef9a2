"""Head pruning on encoders: ViT classifier top-1 agreement and CLIP zero-shot agreement / embedding
cosine against the unpruned model, per importance score and fraction of heads removed, with
parameters and latency. Random-weight ViT-S/16 and CLIP-S shaped models (no pretrained vision
weights are reachable offline): the numbers check the machinery and its trends, not a trained
model's quality.

    python eval/benchmarks/heads_vision.py        # ~5 min on 2 CPU cores
Writes eval/results/heads-vision/{results.md, results.json}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from attnpatch import head_importance, patch_model, unpatch_model
from attnpatch.evaluation.speed import best_seconds
from attnpatch.evaluation.vision import classifier_outputs, clip_outputs, compare_classifier, compare_clip

SCORES = ("gradient", "output_norm", "entropy", "random")


def vit():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                                               intermediate_size=1536, image_size=224, patch_size=16,
                                               num_labels=100)).eval()


def clip():
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    torch.manual_seed(0)
    text = CLIPTextConfig(hidden_size=256, num_hidden_layers=6, num_attention_heads=8, intermediate_size=1024,
                          vocab_size=1000, max_position_embeddings=32)
    vision = CLIPVisionConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                              image_size=224, patch_size=16)
    return CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=256)).eval()


def images(count: int, seed: int) -> torch.Tensor:
    """Smooth random images (low-frequency noise upsampled), closer to natural image statistics than white noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(count, 3, 14, 14, generator=g)
    return torch.nn.functional.interpolate(coarse, size=224, mode="bicubic", align_corners=False)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--calibration", type=int, default=16)
    parser.add_argument("--out", default="eval/results/heads-vision")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pixels, calibration = images(args.images, 0), images(args.calibration, 1)
    results = {"setup": vars(args), "vit": [], "clip": []}

    model = vit()
    importance = head_importance(model, [{"pixel_values": calibration[i:i + 8]} for i in range(0, len(calibration), 8)])
    dense = classifier_outputs(model, pixels)
    one = pixels[:8]
    dense_seconds = best_seconds(lambda: model(pixel_values=one), repeats=3)
    for removed in (1, 2, 3, 4):
        for score in SCORES:
            patch_model(model, importance.plan(removed / 6, score=score))
            with torch.no_grad():
                seconds = best_seconds(lambda: model(pixel_values=one), repeats=3)
                logits = classifier_outputs(model, pixels)
            cosine = float(torch.nn.functional.cosine_similarity(logits, dense, dim=-1).mean())
            row = {"heads_removed_per_layer": removed, "fraction": removed / 6, "score": score,
                   **compare_classifier(dense, logits), "logit_cosine": cosine, "params": n_params(model),
                   "speedup": dense_seconds / seconds}
            unpatch_model(model)
            results["vit"].append(row)
            print("vit", row)

    model = clip()
    text_ids = torch.randint(1, 1000, (10, 12), generator=torch.Generator().manual_seed(3))
    batch = {"pixel_values": calibration[:10], "input_ids": text_ids}
    importance = head_importance(model, [batch])
    dense = clip_outputs(model, pixels, text_ids)
    for fraction in (1 / 6, 2 / 6, 3 / 6):
        for score in SCORES:
            for tower in importance.towers:
                patch_model(model, importance.plan(fraction, score=score, tower=tower))
            row = {"fraction": fraction, "score": score, **compare_clip(dense, clip_outputs(model, pixels, text_ids)),
                   "params": n_params(model)}
            unpatch_model(model)
            results["clip"].append(row)
            print("clip", row)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_report(results, out)


def write_report(results: dict, out: Path) -> None:
    setup = results["setup"]
    lines = ["# Head pruning on encoders (random-weight ViT-S/16 and CLIP-S, see eval/benchmarks/heads_vision.py)", "",
             f"{setup['images']} smooth random 224x224 images; importance from {setup['calibration']} others. Same "
             "fraction of heads removed in every layer (ViT: 6 heads per layer; CLIP: vision 6, text 8, both towers "
             "pruned).", "",
             "## ViT classifier (100 classes) vs the unpruned model", "",
             "| heads removed per layer | score | top-1 agreement | logit cosine | parameters (M) | speed-up (8 images) |",
             "|---|---|---|---|---|---|"]
    for row in results["vit"]:
        lines.append(f"| {row['heads_removed_per_layer']} of 6 | {row['score']} | {row['top1_agreement']:.2f} | "
                     f"{row['logit_cosine']:.3f} | {row['params'] / 1e6:.2f} | {row['speedup']:.2f}x |")
    lines += ["", "## CLIP embeddings vs the unpruned model", "",
              "With random weights every image picks the same one of the 10 prompts, so zero-shot agreement is 0 or "
              "1 and says nothing (it is in results.json); the embedding cosines are the measure.", "",
              "| fraction removed | score | image embedding cosine | text embedding cosine | parameters (M) |",
              "|---|---|---|---|---|"]
    for row in results["clip"]:
        lines.append(f"| {row['fraction']:.2f} | {row['score']} | {row['image_embedding_cosine']:.3f} | "
                     f"{row['text_embedding_cosine']:.3f} | {row['params'] / 1e6:.2f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--report-only"]:  # tables again from a finished run's results.json
        folder = Path(sys.argv[2] if len(sys.argv) > 2 else "eval/results/heads-vision")
        write_report(json.loads((folder / "results.json").read_text()), folder)
    else:
        main()
