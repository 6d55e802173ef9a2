"""Visual-token pruning (FasterVLM / FoPru) and VAR on a real LLaVA-1.5 checkpoint.

    python examples/llava_visual_tokens.py photo.jpg [--model llava-hf/llava-1.5-7b-hf] [--ratio 0.25]

Generates a description with the dense model, then with 25% of the 576 image tokens (ranked by the
vision tower's [CLS] attention) and with VAR, and prints the prefill token counts and times. For a
batch of images with agreement metrics: attnpatch eval --model MODEL --metrics llava --images DIR
--methods dense visual_token_prune:ratio=0.25 var
"""

from __future__ import annotations

import argparse
import time

import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from attnpatch import patch_model, unpatch_model


def describe(model, processor, inputs, label: str) -> None:
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=40, do_sample=False, return_dict_in_generate=True,
                             output_scores=True)
    seconds = time.perf_counter() - start
    prompt = out.sequences.shape[1] - len(out.scores)  # the prompt as the language model saw it
    text = processor.batch_decode(out.sequences[:, prompt:], skip_special_tokens=True)[0]
    print(f"[{label}] prompt of {prompt} tokens, {seconds:.1f} s: {text.strip()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image")
    parser.add_argument("--model", default="llava-hf/llava-1.5-7b-hf")
    parser.add_argument("--ratio", type=float, default=0.25)
    args = parser.parse_args()
    dtype = torch.float16 if torch.cuda.is_available() else torch.float32
    model = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=dtype,
                                                          device_map="auto" if torch.cuda.is_available() else None)
    processor = AutoProcessor.from_pretrained(args.model)
    prompt = "USER: <image>\nDescribe the image in one sentence. ASSISTANT:"
    inputs = processor(images=Image.open(args.image).convert("RGB"), text=prompt, return_tensors="pt").to(model.device)
    describe(model, processor, inputs, "dense")
    patch_model(model, "visual_token_prune", ratio=args.ratio)
    describe(model, processor, inputs, f"visual_token_prune ratio={args.ratio}")
    unpatch_model(model)
    patch_model(model, "var")
    describe(model, processor, inputs, "var")
    unpatch_model(model)


if __name__ == "__main__":
    main()
