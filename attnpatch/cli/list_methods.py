"""`attnpatch list`: every method with its family, parameters, defaults and ranges."""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("list", help="list methods with their parameters and valid ranges")
    p.add_argument("--json", action="store_true")
    p.add_argument("--papers", action="store_true", help="each method's paper and its declared deviations from it")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..registry import list_methods

    methods = list_methods()
    if args.papers:
        for m in methods:
            paper = f"{m.paper['title']} ({m.paper['year']}) {m.paper['url']}" if m.paper else "no paper"
            print(f"{m.name}: {paper}")
            for deviation in m.deviations or ("no known deviation",):
                print(f"    - {deviation}")
        return 0
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
