"""`attnpatch compare`: the main job, one training-free setting per family beside dense."""

from __future__ import annotations

import time
from pathlib import Path


def register(sub) -> None:
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
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ..api import CONFIG_FILE
    from ..evaluation.data import load_text
    from ..evaluation.main_job import JobSettings, main_job, write_outputs
    from ..models import DEFAULT_MODEL, load_model

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
