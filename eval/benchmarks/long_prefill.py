"""Prefill time and peak memory against length, 4k to 128k tokens, for dense SDPA, the attention-free
floor and the long-context methods, on SmolLM2-135M (the embedded checkpoint), one CPU process.

    python eval/benchmarks/long_prefill.py --out eval/results/long-prefill            # ~1 h on 2 cores
    python eval/benchmarks/long_prefill.py --lengths 2048 4096 --methods linear --out /tmp/quick

Each length runs in a child process (so one length's memory cannot inflate the next's). In the
child every row (dense up to --dense-max, the floor, each method)
is timed in turn, the order rotating between repeats, so the machine's noise falls on all rows
alike; a row's time is its fastest repeat and its memory the largest resident-set growth during
one forward (the kernel's high-water mark, reset before each, after freed memory is handed back). One forward is the base model plus
the language-model head on the last position only (`logits_to_keep=1`): a 128k-token prompt never
materialises 128k x 49k logits. Writes prefill.json, prefill.md and prefill.png (log-log time and
memory against length) into --out after every length.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

DEFAULT_METHODS = ["linear", "sliding_window", "a_shape", "block_topk", "lolcats"]


def child(length: int, args) -> list[dict]:
    from attnpatch import patch_model, patched_methods, unpatch_model
    from attnpatch.config import parse_method_spec
    from attnpatch.evaluation.floor import attention_free
    from attnpatch.evaluation.memory import peak_memory
    from attnpatch.evaluation.speed import random_ids
    from attnpatch.models import load_default_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = load_default_model()
    model.eval()
    ids = random_ids(model, length, seed=length)
    rows = (["dense"] if length <= args.dense_max else []) + ["floor"] + list(args.methods)
    specs = {row: row for row in rows}  # row label -> method spec
    if length <= args.density_max_length:  # budgets that keep a fixed share of the causal blocks at this length
        from sparse_speed import budget_params

        for density in args.density:
            for variant in args.density_methods:  # "block_topk" or "block_topk:query_pooling=mean"
                method, _, extra = variant.partition(":")
                params = {**budget_params(method, length, 64, density),
                          **dict(item.split("=", 1) for item in extra.split(",") if item)}
                label = f"{method} ({extra})" if extra else method
                specs[f"{label} @{density:.0%} of blocks"] = f"{method}:" + ",".join(f"{k}={v}" for k, v in params.items())
        rows += [label for label in specs if label not in rows]

    @torch.no_grad()
    def forward(tokens):
        model(input_ids=tokens, use_cache=False, logits_to_keep=1)

    def run(row: str, tokens) -> tuple[float, int, float | None]:
        import time

        density = None
        if row == "floor":
            with attention_free(model), peak_memory() as mem:
                start = time.perf_counter()
                forward(tokens)
                seconds = time.perf_counter() - start
            return seconds, mem["bytes"], density
        if row != "dense":
            patch_model(model, parse_method_spec(specs[row]))
        try:
            with peak_memory() as mem:
                start = time.perf_counter()
                forward(tokens)
                seconds = time.perf_counter() - start
            densities = [m.last_density for m in patched_methods(model) if getattr(m, "last_density", None) is not None]
            density = sum(densities) / len(densities) if densities else None
        finally:
            if row != "dense":
                unpatch_model(model)
        return seconds, mem["bytes"], density

    warm = random_ids(model, 1024, seed=1)
    for row in rows:  # warm-up: first calls of every code path, outside the measurement
        run(row, warm)
    measured = {row: {"seconds": [], "peak_bytes": [], "density": None} for row in rows}
    for repeat in range(args.repeats if length <= 16384 else args.repeats_long):
        shift = repeat % len(rows)
        for row in rows[shift:] + rows[:shift]:
            seconds, peak, density = run(row, ids)
            measured[row]["seconds"].append(seconds)
            measured[row]["peak_bytes"].append(peak)
            measured[row]["density"] = density
            print(json.dumps({"progress": row, "tokens": length, "seconds": round(seconds, 2),
                              "peak_mb": round(peak / 2**20)}), file=sys.stderr, flush=True)
    return [{"tokens": length, "row": row, "spec": specs[row], "seconds": min(m["seconds"]), "runs": m["seconds"],
             "peak_mb": max(m["peak_bytes"]) / 2**20, "density": m["density"]} for row, m in measured.items()]


def model_arithmetic(config) -> dict:
    """FLOPs per token per layer of the floor (the q/k/v/o projections and the MLP: what costs anything
    when attention returns V) and of attention per (query, key) pair per layer (QK and PV, all heads)."""
    c = config.get_text_config()
    hq, hkv = c.num_attention_heads, c.num_key_value_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // hq
    projections = c.hidden_size * head_dim * (2 * hq + 2 * hkv)
    return {"floor_flops_per_token_layer": 2 * (projections + 3 * c.hidden_size * c.intermediate_size),
            "attention_flops_per_pair_layer": 4 * hq * head_dim}


def arithmetic_bound(arithmetic: dict, tokens: int, density: float) -> float:
    """The least `method / floor` a row computing this share of the causal (query, key) pairs can reach
    when its attention runs at the floor's FLOP rate: 1 + attention FLOPs / floor FLOPs."""
    pairs = density * tokens * (tokens + 1) / 2
    return 1 + pairs * arithmetic["attention_flops_per_pair_layer"] / (tokens * arithmetic["floor_flops_per_token_layer"])


def with_ratios(rows: list[dict]) -> list[dict]:
    by_length: dict[int, dict[str, dict]] = {}
    for r in rows:
        by_length.setdefault(r["tokens"], {})[r["row"]] = r
    for cells in by_length.values():
        floor, dense = cells.get("floor"), cells.get("dense")
        for r in cells.values():
            r["vs_floor"] = r["seconds"] / floor["seconds"] if floor else None
            r["dense_over_method"] = dense["seconds"] / r["seconds"] if dense else None
    return rows


def markdown(results: dict) -> str:
    """The table; `arithmetic bound` (rows whose share of the causal pairs is known: dense, and the
    block-sparse rows' measured density) is the least `method / floor` their attention FLOPs allow."""
    rows, arithmetic = results["rows"], results.get("arithmetic")
    lines = ["| tokens | row | seconds | method / floor | arithmetic bound | dense / method | peak memory growth (MB) "
             "| density |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = lambda x: "-" if x is None else f"{x:.2f}x"  # noqa: E731
        density = "-" if r["density"] is None else f"{r['density']:.3f}"
        share = 1.0 if r["row"] == "dense" else r["density"]
        bound = None if share is None or arithmetic is None else arithmetic_bound(arithmetic, r["tokens"], share)
        name = r["row"] if r.get("spec", r["row"]) == r["row"] else f"{r['row']} (`{r['spec']}`)"
        lines.append(f"| {r['tokens']} | {name} | {r['seconds']:.1f} | {ratio(r['vs_floor'])} | {ratio(bound)} "
                     f"| {ratio(r['dense_over_method'])} | {r['peak_mb']:.0f} | {density} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (time_ax, mem_ax) = plt.subplots(1, 2, figsize=(11, 4.3))
    names = list(dict.fromkeys(r["row"] for r in results["rows"]))
    for name in names:
        rows = sorted((r for r in results["rows"] if r["row"] == name), key=lambda r: r["tokens"])
        style = {"dense": {"color": "black", "linestyle": "--"}, "floor": {"color": "black", "linestyle": ":"}}.get(name, {})
        label = {"floor": "floor (attention costs nothing)", "dense": "dense SDPA"}.get(name, name)
        for ax, key in ((time_ax, "seconds"), (mem_ax, "peak_mb")):
            ax.plot([r["tokens"] for r in rows], [r[key] for r in rows], marker="o", label=label, **style)
    for ax, ylabel, title in ((time_ax, "seconds", "prefill time"), (mem_ax, "MB", "peak memory growth")):
        ax.set(xscale="log", yscale="log", xlabel="prompt tokens", ylabel=ylabel, title=title)
        ax.set_xticks(sorted({r["tokens"] for r in results["rows"]}))
        ax.set_xticklabels([f"{t // 1024}k" for t in sorted({r["tokens"] for r in results["rows"]})])
        ax.grid(True, which="both", alpha=0.3)
    time_ax.legend(fontsize=8)
    fig.suptitle(f"SmolLM2-135M prefill, one forward (last logits only), {results['environment']['threads']} CPU threads")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "prefill.json").write_text(json.dumps(results, indent=1))
    commands = results.get("commands") or [results["command"]]
    (out / "prefill.md").write_text("# Prefill time and memory against length\n\n"
                                    + "".join(f"`{c}`\n\n" for c in commands) + markdown(results) + "\n")
    plot(results, out / "prefill.png")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536, 131072])
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, help="method specs, e.g. a_shape:local_blocks=8")
    parser.add_argument("--dense-max", type=int, default=32768, help="longest prompt dense SDPA runs on (O(n^2) time)")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats per row up to 16k tokens")
    parser.add_argument("--repeats-long", type=int, default=1, help="timed repeats per row above 16k tokens")
    parser.add_argument("--density", type=float, nargs="*", default=[0.1],
                        help="also a_shape and block_topk with budgets keeping this share of causal key blocks")
    parser.add_argument("--density-methods", nargs="+", default=["a_shape", "block_topk"],
                        help="methods the --density rows run, each with optional fixed parameters "
                             "(block_topk:query_pooling=mean)")
    parser.add_argument("--density-max-length", type=int, default=32768, help="longest prompt the --density rows run on")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=Path("eval/results/long-prefill"))
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--merge", type=Path, nargs="+", default=None,
                        help="only merge these prefill.json files (e.g. a separate 128k run) into --out and redraw")
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child, args)))
        return
    from attnpatch.models import load_model_config

    arithmetic = model_arithmetic(load_model_config())
    if args.merge:
        parts = [json.loads(path.read_text()) for path in args.merge]
        merged = {**parts[0], "commands": [c for part in parts for c in (part.get("commands") or [part.get("command")])],
                  "arithmetic": arithmetic, "rows": with_ratios([row for part in parts for row in part["rows"]])}
        write(merged, args.out)
        return

    from attnpatch.evaluation.report import environment

    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"environment": environment(0), "command": " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
               "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "child"},
               "arithmetic": arithmetic, "rows": []}
    forwarded = ["--methods", *args.methods, "--density", *map(str, args.density), "--density-methods", *args.density_methods,
                 "--density-max-length", str(args.density_max_length), "--dense-max", str(args.dense_max), "--repeats", str(args.repeats),
                 "--repeats-long", str(args.repeats_long), "--threads", str(args.threads)]
    for length in args.lengths:
        print(f"{length} tokens", flush=True)
        done = subprocess.run([sys.executable, __file__, "--child", str(length), *forwarded],
                              stdout=subprocess.PIPE, text=True)
        if done.returncode != 0:
            raise SystemExit(f"the {length}-token child failed (exit {done.returncode}); results so far are in {args.out}")
        results["rows"] = with_ratios(results["rows"] + json.loads(done.stdout.strip().splitlines()[-1]))
        write(results, args.out)
        print(markdown({"rows": [r for r in results["rows"] if r["tokens"] == length]}), flush=True)


if __name__ == "__main__":
    main()
