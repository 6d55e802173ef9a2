"""`attnpatch` command line: list methods, patch and save a model, compare methods before/after."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .errors import PatchError

DEFAULT_COMPARE = ["dense", "sliding_window:window=256,sinks=4", "sliding_window:window=64,sinks=4", "linear"]


def _cmd_list(args) -> int:
    from .registry import list_methods

    methods = list_methods()
    if args.json:
        print(json.dumps([m.as_dict() for m in methods], indent=2))
        return 0
    for m in methods:
        trains = "yes" if m.trainable else "no"
        if m.trainable_note:
            trains += f" ({m.trainable_note})"
        print(f"{m.name}  [{m.family}]  models: {', '.join(m.model_kinds)}  trains parameters: {trains}")
        print(f"    {m.summary}")
        for p in m.params:
            print(f"    --param {p['name']}={p['default']!r:<10} {p['range']:<32} {p['help']}")
        print()
    return 0


def _parse_params(items: list[str]) -> dict:
    from .config import parse_value

    params = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise PatchError(f"--param expects key=value, got {item!r}")
        params[key] = parse_value(value)
    return params


def _cmd_patch(args) -> int:
    from .api import patch_model, save_patched
    from .config import PatchConfig
    from .models import load_model

    layers = "all" if args.layers in (None, "all") else [int(x) for x in args.layers.split(",")]
    config = PatchConfig(args.method, _parse_params(args.param), layers, towers=args.towers).validated()
    model, tokenizer = load_model(args.model)  # after validation: bad input fails before the slow load
    patch_model(model, config)
    out = save_patched(model, args.out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    print(f"saved patched {type(model).__name__} ({args.method}) to {out}; reload with attnpatch.load_patched({str(out)!r})")
    return 0


def _cmd_compare(args) -> int:
    import torch

    from .api import CONFIG_FILE
    from .evaluation.data import load_text
    from .evaluation.main_job import JobSettings, main_job, write_outputs
    from .models import DEFAULT_MODEL, load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    checkpoints, base = list(args.checkpoint or []), args.model
    if (Path(base) / CONFIG_FILE).is_file():  # a recipe's final/: it joins the table beside the base model
        checkpoints.insert(0, base)
        base = DEFAULT_MODEL
        print(f"{args.model} is a patched checkpoint: it joins the table as a row; dense = {base}")
    settings = JobSettings(args.prompt_tokens, args.decode_tokens, args.prefill_tokens, args.repeats)
    start = time.perf_counter()
    model, tokenizer = load_model(base)
    model.eval()
    text, what = load_text(args.data)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    print(f"text: {what}; quality = perplexity of {settings.decode_tokens} tokens decoded after a "
          f"{settings.prompt_tokens}-token prompt; prefill at {settings.prefill_tokens} tokens", flush=True)
    rows = main_job(model, ids, args.methods, checkpoints, settings)
    footer = (f"{what}; CPU threads: {torch.get_num_threads()}; KV bytes read from the cache after decoding; "
              f"speeds are ratios to dense measured in this run; total {time.perf_counter() - start:.0f} s")
    table = write_outputs(rows, settings, Path(args.out), base, what, footer)
    print(f"{table}\n{footer}\nwrote compare.md, compare.json and the plot compare.png to {args.out}")
    return 0


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
    from .evaluation.vision import llava_prompt_inputs

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
    from .models import load_model

    return load_model(args.model)


def _cmd_eval(args) -> int:
    import torch

    from .evaluation.report import VISION_METRICS, EvalSettings, run_grid

    if args.threads:
        torch.set_num_threads(args.threads)
    vision = [m for m in args.metrics if m in VISION_METRICS]
    if vision and len(vision) != len(args.metrics):
        raise PatchError("vision metrics (vit, clip, dit, llava) and text metrics need different models; run them separately")
    from .config import parse_method_spec

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
    from .evaluation.report import render_markdown

    print(render_markdown(report))
    print(f"wrote {out}/report.md, results.json and plots")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="attnpatch", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list methods with their parameters and valid ranges")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("patch", help="patch a model and save it (HF checkpoint + attnpatch_config.json)")
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default), a local folder or a hub id")
    p.add_argument("--method", required=True)
    p.add_argument("--param", action="append", metavar="KEY=VALUE", help="method parameter (repeatable)")
    p.add_argument("--layers", default="all", help="'all' or comma-separated layer indices")
    p.add_argument("--towers", nargs="+", default=None, help="path substrings of the stacks to patch")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_patch)

    p = sub.add_parser("compare", help="main job: one setting per family beside dense: quality, KV bytes, "
                       "prefill and decode speed, a table and a plot")
    p.add_argument("--model", default="smollm2-135m",
                   help="base model; a patched checkpoint folder (a recipe's final/) joins as a row beside the default")
    p.add_argument("--checkpoint", nargs="+", default=None, help="patched checkpoint folders to add as rows")
    p.add_argument("--data", default=None,
                   help="text file, WikiText-2 folder, 'wikitext2' (hub) or 'fallback'; default: WikiText-2 if found")
    p.add_argument("--methods", nargs="+", default=None,
                   help="'dense' or NAME[:key=value,...]; default: dense, block_topk, "
                        "sliding_window:window=256,sinks=4, snapkv:compression=0.75, kv_quant:bits=4")
    p.add_argument("--prompt-tokens", type=int, default=1536, help="prompt before the scored tokens")
    p.add_argument("--decode-tokens", type=int, default=256, help="tokens decoded and scored one at a time")
    p.add_argument("--prefill-tokens", type=int, default=4096, help="length of the timed prefill")
    p.add_argument("--repeats", type=int, default=2, help="timed prefills per row (best kept)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default="attnpatch-compare", help="folder for compare.md, compare.json, compare.png")
    p.set_defaults(func=_cmd_compare)

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
    p.set_defaults(func=_cmd_eval)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "max_tokens", None) == 0:
        args.max_tokens = None
    try:
        return args.func(args)
    except PatchError as err:
        print(f"attnpatch: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
