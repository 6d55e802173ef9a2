"""Measurements for the core issue on SmolLM2-135M (CPU): perplexity, decoding memory, prefill time.

    python eval/benchmarks/core_measurements.py --stage all --out eval/results/core_smollm2.json

Stages: ppl (WikiText-2 test, 1024-token windows: dense, sliding_window 64/256 with 4 sinks,
untrained linear), decode (KV/state bytes and peak memory after 4096 generated tokens, linear
vs dense), prefill (prefill seconds at 2k/8k/16k tokens, linear vs dense SDPA in the same run).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import transformers

from attnpatch import cache_kwargs, cache_nbytes, patch_model, unpatch_model
from attnpatch.evaluation.compare import compare, format_table
from attnpatch.evaluation.data import load_text
from attnpatch.evaluation.memory import peak_memory
from attnpatch.models import load_default_model

PPL_SPECS = ["dense", "sliding_window:window=256,sinks=4", "sliding_window:window=64,sinks=4", "linear:feature_map=elu"]


def stage_ppl(model, tok, args):
    text, what = load_text(args.data)
    ids = tok(text, return_tensors="pt").input_ids[0]
    rows = compare(model, ids, PPL_SPECS, window=1024, max_tokens=args.max_tokens)
    print(f"\nWikiText-2 perplexity ({what}, {ids.numel()} tokens, 1024-token windows)\n{format_table(rows)}")
    return {"data": what, "total_tokens": int(ids.numel()), "rows": rows}


@torch.no_grad()
def _generate(model, tok, new_tokens):
    from transformers import DynamicCache

    prompt = tok("The history of the city begins", return_tensors="pt")
    cache = DynamicCache(config=model.config)
    with peak_memory() as mem:
        t0 = time.perf_counter()
        out = model.generate(**prompt, **cache_kwargs(model, cache), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False)
        seconds = time.perf_counter() - t0
    generated = out.shape[1] - prompt.input_ids.shape[1]
    return {"generated": int(generated), "cache_bytes": cache_nbytes(cache), "peak_mb": mem["bytes"] / 2**20,
            "tokens_per_s": generated / seconds, "seconds": seconds}


def stage_decode(model, tok, args):
    rows = {}
    for label in ("dense", "linear"):
        if label == "linear":
            patch_model(model, "linear")
        rows[label] = _generate(model, tok, args.decode_tokens)
        if label == "linear":
            unpatch_model(model)
        print(label, rows[label], flush=True)
    rows["cache_ratio_linear_vs_dense"] = rows["linear"]["cache_bytes"] / rows["dense"]["cache_bytes"]
    return rows


@torch.no_grad()
def _prefill_seconds(model, ids, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
        times.append(time.perf_counter() - t0)
    return min(times)


def stage_prefill(model, tok, args):
    rows = []
    for length in args.lengths:
        ids = torch.randint(10, 40000, (1, length), generator=torch.Generator().manual_seed(length))
        repeats = 2 if length <= 4096 else 1
        dense = _prefill_seconds(model, ids, repeats)
        patch_model(model, "linear")
        linear = _prefill_seconds(model, ids, repeats)
        unpatch_model(model)
        row = {"tokens": length, "dense_s": dense, "linear_s": linear, "ratio_linear_over_dense": linear / dense}
        print(row, flush=True)
        rows.append(row)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", default="all", choices=["all", "ppl", "decode", "prefill"])
    ap.add_argument("--data", default=None)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--decode-tokens", type=int, default=4096)
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 16384])
    ap.add_argument("--out", default="eval/results/core_smollm2.json")
    args = ap.parse_args()
    model, tok = load_default_model()
    model.eval()
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    results["environment"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                              "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
                              "device": "cpu"}
    stages = ["ppl", "decode", "prefill"] if args.stage == "all" else [args.stage]
    for stage in stages:
        results[stage] = globals()[f"stage_{stage}"](model, tok, args)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
