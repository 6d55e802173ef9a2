"""`attnpatch eval`: the before-vs-after report (perplexity, lm-eval, retrieval, vision, speed)."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import PatchError

DEFAULT_COMPARE = ["dense", "sliding_window:window=256,sinks=4", "sliding_window:window=64,sinks=4", "linear"]


def register(sub) -> None:
    p = sub.add_parser("eval", help="before-vs-after report: perplexity, lm-eval, retrieval, vision, speed")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", nargs="+", default=DEFAULT_COMPARE, help="method specs; dense is always included")
    p.add_argument("--metrics", nargs="+", default=["ppl", "decode_ppl", "lm_eval", "passkey", "speed"],
                   help="ppl decode_ppl lm_eval passkey needle speed sinks | vit clip dit llava")
    p.add_argument("--out", default=None, help="output folder (default eval/results/<model>)")
    p.add_argument("--data", default=None, help="perplexity text (see compare --data)")
    p.add_argument("--ppl-tokens", type=int, default=16384, help="tokens scored by ppl (0 = all)")
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--stride", type=int, default=None)
    p.add_argument("--decode-tokens", type=int, default=512, help="decode_ppl: text tokens used in all")
    p.add_argument("--decode-prefill", type=int, default=256,
                   help="decode_ppl: tokens prefilled (and compressed by KV methods) before token-by-token decoding")
    p.add_argument("--tasks", nargs="+", default=["attnpatch_cloze", "attnpatch_next_sentence"],
                   help="lm-eval tasks: local attnpatch_cloze attnpatch_next_sentence, or hub ones "
                        "(piqa arc_easy arc_challenge hellaswag winogrande lambada_openai mmlu)")
    p.add_argument("--limit", type=int, default=200, help="items per lm-eval task (0 = all)")
    p.add_argument("--task-items", type=int, default=200, help="items generated per local task")
    p.add_argument("--task-text", default=None, help="text the local tasks are built from")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048], help="retrieval context lengths")
    p.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--samples", type=int, default=1, help="retrieval prompts per (length, depth)")
    p.add_argument("--query-agnostic", action="store_true",
                   help="retrieval: KV methods compress the context before the question is seen (compress_context)")
    p.add_argument("--speed-lengths", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--decode-prompt", type=int, default=256)
    p.add_argument("--decode-new-tokens", type=int, default=64)
    p.add_argument("--images", default=None, help="folder of images for vit/clip")
    p.add_argument("--dit-steps", type=int, default=20,
                   help="dit: DDIM steps from fixed noise, final latents compared (0: single evaluations at t=999/500/50)")
    p.add_argument("--clip-labels", nargs="+", default=None, help="class prompts for clip zero-shot")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.set_defaults(func=run)


def _vision_inputs(args, model) -> dict:
    """Inputs for the vision metrics: images from --images (a folder) or seeded noise; DiT noise."""
    import torch

    g = torch.Generator().manual_seed(args.seed)
    metrics = set(args.metrics)
    inputs = {}
    if metrics & {"vit", "clip"}:
        if args.images:
            from PIL import Image
            from transformers import AutoImageProcessor

            files = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
            processor = AutoImageProcessor.from_pretrained(args.model)
            inputs["pixel_values"] = processor([Image.open(f).convert("RGB") for f in files], return_tensors="pt")[
                "pixel_values"]
        else:
            cfg = getattr(model.config, "vision_config", model.config)
            print("attnpatch: no --images given; using 16 seeded noise images (agreement only)", file=sys.stderr)
            inputs["pixel_values"] = torch.randn(16, 3, cfg.image_size, cfg.image_size, generator=g)
    if "clip" in metrics:
        from transformers import AutoTokenizer

        labels = args.clip_labels or ["a photo of a cat", "a photo of a dog", "a photo of a car", "a photo of a tree"]
        text = AutoTokenizer.from_pretrained(args.model)(labels, padding=True, return_tensors="pt")
        inputs.update(input_ids=text.input_ids, attention_mask=text.attention_mask)
    if "llava" in metrics:
        inputs["llava"] = _llava_inputs(args, model)
    if "dit" in metrics:
        cfg = model.config
        inputs["sample"] = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
        inputs["timesteps"] = torch.tensor([999, 500, 50])
        inputs["steps"] = args.dit_steps
        if getattr(cfg, "num_embeds_ada_norm", None):
            inputs["conditioning"] = {"class_labels": torch.tensor([1, 2])}
    return inputs


def _llava_inputs(args, model) -> dict:
    """Llava prompts: images from --images with the model's processor and a describe-the-image
    prompt, or (no images) seeded noise images and token ids, for agreement and speed only."""
    from ..evaluation.vision import llava_prompt_inputs

    if not args.images:
        print("attnpatch: no --images given; using 4 seeded noise images and random prompts (agreement and speed only)",
              file=sys.stderr)
        return llava_prompt_inputs(model, seed=args.seed)

    from PIL import Image
    from transformers import AutoProcessor

    files = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    processor = AutoProcessor.from_pretrained(args.model)
    prompt = "USER: <image>\nDescribe the image in one sentence. ASSISTANT:"
    batch = processor(images=[Image.open(f).convert("RGB") for f in files], text=[prompt] * len(files),
                      return_tensors="pt", padding=True)
    return {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}


def _load_for_metrics(args):
    """(model, tokenizer) for text metrics, or a vision model for vit/clip/dit."""
    metrics = set(args.metrics)
    if "llava" in metrics:
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration.from_pretrained(args.model), None
    if "dit" in metrics:
        from diffusers import DiTTransformer2DModel

        try:  # a pipeline folder or hub id (facebook/DiT-XL-2-256) keeps the transformer in a subfolder
            return DiTTransformer2DModel.from_pretrained(args.model, subfolder="transformer"), None
        except OSError:
            return DiTTransformer2DModel.from_pretrained(args.model), None
    if "clip" in metrics:
        from transformers import CLIPModel

        return CLIPModel.from_pretrained(args.model), None
    if "vit" in metrics:
        from transformers import AutoModelForImageClassification

        return AutoModelForImageClassification.from_pretrained(args.model), None
    from ..models import load_model

    return load_model(args.model)


def run(args) -> int:
    import torch

    from ..evaluation.report import METRICS, VISION_METRICS, EvalSettings, run_grid

    unknown = [m for m in args.metrics if m not in METRICS]
    if unknown:  # before anything is loaded
        raise PatchError(f"unknown metric(s) {unknown}; known metrics: {', '.join(METRICS)}")

    if args.threads:
        torch.set_num_threads(args.threads)
    vision = [m for m in args.metrics if m in VISION_METRICS]
    if vision and len(vision) != len(args.metrics):
        raise PatchError("vision metrics (vit, clip, dit, llava) and text metrics need different models; run them separately")
    from ..config import parse_method_spec

    for spec in args.methods:  # fail on a bad method before loading anything
        parse_method_spec(spec)
    settings = EvalSettings(
        data=args.data, ppl_tokens=args.ppl_tokens or None, ppl_window=args.window, ppl_stride=args.stride,
        decode_tokens=args.decode_tokens, decode_prefill=args.decode_prefill, lm_eval_tasks=args.tasks, lm_eval_limit=args.limit or None,
        task_items=args.task_items, task_text=args.task_text, retrieval_lengths=args.lengths,
        retrieval_depths=args.depths, retrieval_samples=args.samples, query_agnostic=args.query_agnostic, speed_lengths=args.speed_lengths,
        decode_prompt=args.decode_prompt, decode_new_tokens=args.decode_new_tokens, seed=args.seed)
    torch.manual_seed(args.seed)
    model, tokenizer = _load_for_metrics(args)
    vision_inputs = _vision_inputs(args, model) if vision else None
    out = args.out or f"eval/results/{args.model.rstrip('/').split('/')[-1]}"
    report = run_grid(model, tokenizer, args.methods, args.metrics, settings, out, vision_inputs, model_name=args.model)
    from ..evaluation.report import render_markdown

    print(render_markdown(report))
    print(f"wrote {out}/report.md, results.json and plots")
    return 0
