"""`attnpatch` command line: list methods, patch and save a model, compare methods before/after."""

from __future__ import annotations

import argparse
import json
import sys

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
    from .bench import parse_value

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

    from .bench import compare, format_table, load_text
    from .models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    model.eval()
    text, what = load_text(args.data)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    used = min(ids.numel(), args.max_tokens) if args.max_tokens else ids.numel()
    print(f"text: {what}; {used} of {ids.numel()} tokens in {args.window}-token windows", flush=True)
    rows = compare(model, ids, args.methods, window=args.window, max_tokens=args.max_tokens)
    print(format_table(rows))
    print(f"(CPU threads: {torch.get_num_threads()}; peak MB = process memory growth during the run; "
          "speeds are ratios to dense measured in this run)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"text": what, "tokens": used, "rows": rows}, f, indent=2)
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

    p = sub.add_parser("compare", help="main job: perplexity, tokens/s and peak memory, dense vs methods")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default=None,
                   help="text file, WikiText-2 folder, 'wikitext2' (hub) or 'fallback'; default: WikiText-2 if found")
    p.add_argument("--methods", nargs="+", default=DEFAULT_COMPARE,
                   help="'dense' or NAME[:key=value,...], e.g. sliding_window:window=64,sinks=4")
    p.add_argument("--window", type=int, default=1024, help="tokens per perplexity window")
    p.add_argument("--max-tokens", type=int, default=8192, help="tokens of text to score (0 = all)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.set_defaults(func=_cmd_compare)
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
