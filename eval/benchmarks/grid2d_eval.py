"""2-D patch-grid methods (window_2d, agent) on ViT and DiT: speed vs dense SDPA (same run) and
agreement with the dense model, at growing image sizes.

    python eval/benchmarks/grid2d_eval.py --out eval/results/grid2d

Models are tiny-width with random weights (no hub here): a ViT (hidden 192, 3 heads, 4 layers,
patch 8) and a DiT (DiTTransformer2DModel, 4 heads x 64, 2 layers, patch 2), built from configs at
each size. Speed does not depend on the weights. Agreement does: random weights attend almost
uniformly, so the numbers show how far each method moves such a model, not what it costs a
trained one (whose attention is far more local); compare methods with each other, not with papers.

The window keeps a fixed neighbourhood in patches (tile 8, a 3x3 or 5x5 window of tiles = 24x24 or
40x40 patches), so its share of the key blocks falls as the image grows; agent attention uses
8x8 = 64 agents. Writes grid2d.json, grid2d.md and grid2d.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from attnpatch import patch_model, patched_methods, unpatch_model
from attnpatch.evaluation.report import environment
from attnpatch.evaluation.speed import best_seconds, style_speedup_axes
from attnpatch.evaluation.vision import compare_dit

METHODS = {
    "window_2d 3x3 tiles of 8": ("window_2d", {"tile": 8, "window_tiles": 3}),
    "window_2d 5x5 tiles of 8": ("window_2d", {"tile": 8, "window_tiles": 5}),
    "agent 8x8": ("agent", {"agent_grid": 8}),
}


def vit(image_size: int):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=768,
                       image_size=image_size, patch_size=8, attn_implementation="sdpa")
    return ViTModel(config, add_pooling_layer=False).eval()


def dit(sample_size: int):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    return DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=64, in_channels=4, out_channels=4,
                                 num_layers=2, sample_size=sample_size, patch_size=2, num_embeds_ada_norm=10,
                                 norm_num_groups=1).eval()


def agreement(kind: str, dense, patched) -> dict:
    if kind == "dit":
        return compare_dit(dense, patched)
    cos = torch.nn.functional.cosine_similarity
    return {"cls_cosine": float(cos(patched[:, 0], dense[:, 0], dim=-1).mean()),
            "token_cosine": float(cos(patched, dense, dim=-1).mean())}


@torch.no_grad()
def rows_for(kind: str, size: int, repeats: int) -> list[dict]:
    g = torch.Generator().manual_seed(size)
    if kind == "vit":
        model, pixels = vit(size), torch.randn(1, 3, size, size, generator=g)
        tokens = (size // 8) ** 2 + 1

        def forward():
            return model(pixel_values=pixels).last_hidden_state
    else:
        model, latent = dit(size), torch.randn(1, 4, size, size, generator=g)
        tokens = (size // 2) ** 2

        def forward():
            return model(latent, timestep=torch.tensor([500]), class_labels=torch.tensor([1])).sample
    reference = forward()
    dense = [best_seconds(forward, repeats)]
    rows = []
    for label, (method, params) in METHODS.items():
        patch_model(model, method, **params)
        out = forward()
        seconds = best_seconds(forward, repeats)
        density = [getattr(m, "last_density", None) for m in patched_methods(model)]
        unpatch_model(model)
        rows.append({"model": kind, "size": size, "tokens": tokens, "method": label, "params": params,
                     "density": None if None in density else sum(density) / len(density), "seconds": seconds,
                     **agreement(kind, reference, out)})
        print(rows[-1], flush=True)
    dense.append(best_seconds(forward, repeats))
    for row in rows:
        row["dense_seconds"] = min(dense)
        row["speedup"] = min(dense) / row["seconds"]
    return rows


def markdown(rows: list[dict]) -> str:
    lines = []
    for kind, title in (("vit", "ViT (hidden 192, 4 layers, patch 8), last hidden state"),
                        ("dit", "DiT (4 x 64 heads, 2 layers, patch 2), one denoiser call")):
        lines += [f"## {title}", "",
                  "| image | tokens | method | key share | seconds | dense SDPA seconds | speedup | agreement |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if r["model"] == kind):
            share = "-" if r["density"] is None else f"{r['density']:.3f}"
            agree = (f"CLS cos {r['cls_cosine']:.3f}, token cos {r['token_cosine']:.3f}" if kind == "vit"
                     else f"PSNR {r['psnr_db']:.1f} dB")
            lines.append(f"| {r['size']}px | {r['tokens']} | {r['method']} | {share} | {r['seconds']:.3f} "
                         f"| {r['dense_seconds']:.3f} | {r['speedup']:.2f}x | {agree} |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, kind in zip(axes, ("vit", "dit")):
        for label in METHODS:
            sel = [r for r in rows if r["model"] == kind and r["method"] == label]
            ax.plot([r["tokens"] for r in sel], [r["speedup"] for r in sel], "o-", label=label)
        style_speedup_axes(ax, "tokens", kind.upper())
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="eval/results/grid2d")
    parser.add_argument("--vit-sizes", type=int, nargs="+", default=[224, 448, 896])
    parser.add_argument("--dit-sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for kind, sizes in (("vit", args.vit_sizes), ("dit", args.dit_sizes)):
        for size in sizes:
            rows += rows_for(kind, size, args.repeats)
            (out / "grid2d.json").write_text(json.dumps({"environment": environment(0), "settings": vars(args),
                                                         "rows": rows}, indent=1))
    (out / "grid2d.md").write_text("# 2-D patch-grid methods vs dense SDPA\n\n" + markdown(rows))
    plot(rows, out / "grid2d.png")
    print(markdown(rows))


if __name__ == "__main__":
    main()
