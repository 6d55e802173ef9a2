"""A small Llava to measure visual-token pruning and VAR on: a random CLIP vision tower shaped like
LLaVA-1.5's input (336 px, 14 px patches = 576 image tokens, 12 layers of width 384) and SmolLM2-135M
as the language model (its real weights; the projector is random). Builds the checkpoint, then runs
`attnpatch eval --metrics llava` on it:

    python eval/benchmarks/llava_smollm2.py        # ~5 min on 2 CPU cores
Writes the checkpoint to /tmp/attnpatch-llava-smollm2 and results to eval/results/llava-smollm2/.
For a real LLaVA: attnpatch eval --model llava-hf/llava-1.5-7b-hf --metrics llava --images DIR --methods ...
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

METHODS = ["dense", "visual_token_prune:ratio=0.5", "visual_token_prune:ratio=0.25", "visual_token_prune:ratio=0.1",
           "visual_token_prune:ratio=0.05", "visual_token_prune:ratio=0.25,mode=row", "var"]


def build(folder: Path) -> None:
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    from attnpatch.models import load_default_model

    language, tokenizer = load_default_model()
    vision = CLIPVisionConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6,
                              image_size=336, patch_size=14, projection_dim=384)
    text = language.config
    image_token = text.vocab_size - 1  # reuse the last id as the image placeholder
    config = LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=image_token,
                         vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu")
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    model.model.language_model.load_state_dict(language.model.state_dict())
    model.lm_head.load_state_dict(language.lm_head.state_dict())
    with torch.no_grad():  # a projector whose outputs sit at the scale of SmolLM2's embeddings
        scale = language.model.embed_tokens.weight.std() / 0.02
        model.model.multi_modal_projector.linear_2.weight.mul_(scale / 10)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="/tmp/attnpatch-llava-smollm2")
    parser.add_argument("--out", default="eval/results/llava-smollm2")
    parser.add_argument("--methods", nargs="+", default=METHODS)
    args = parser.parse_args()
    folder = Path(args.checkpoint)
    if not (folder / "config.json").exists():
        build(folder)
    from attnpatch.cli import main as cli

    cli(["eval", "--model", str(folder), "--metrics", "llava", "--out", args.out, "--methods", *args.methods])


if __name__ == "__main__":
    main()
