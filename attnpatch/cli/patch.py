"""`attnpatch patch`: patch a model and save it with its model card."""

from __future__ import annotations

from ..errors import PatchError


def register(sub) -> None:
    p = sub.add_parser("patch", help="patch a model and save it (HF checkpoint + attnpatch_config.json)")
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default), a local folder or a hub id")
    p.add_argument("--method", required=True)
    p.add_argument("--param", action="append", metavar="KEY=VALUE", help="method parameter (repeatable)")
    p.add_argument("--layers", default="all", help="'all' or comma-separated layer indices")
    p.add_argument("--towers", nargs="+", default=None, help="path substrings of the stacks to patch")
    p.add_argument("--out", required=True)
    p.set_defaults(func=run)


def _parse_params(items: list[str]) -> dict:
    from ..config import parse_value

    params = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise PatchError(f"--param expects key=value, got {item!r}")
        params[key] = parse_value(value)
    return params


def run(args) -> int:
    from ..api import patch_model, save_patched
    from ..config import PatchConfig
    from ..models import load_model

    layers = "all" if args.layers in (None, "all") else [int(x) for x in args.layers.split(",")]
    config = PatchConfig(args.method, _parse_params(args.param), layers, towers=args.towers).validated()
    model, tokenizer = load_model(args.model)  # after validation: bad input fails before the slow load
    patch_model(model, config)
    out = save_patched(model, args.out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    print(f"saved patched {type(model).__name__} ({args.method}) to {out}; reload with attnpatch.load_patched({str(out)!r})")
    return 0
