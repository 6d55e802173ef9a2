"""Prefill latency of the block-sparse methods against dense SDPA, measured in the same run.

    python eval/benchmarks/sparse_speed.py --out eval/results/sparse-speed

A tiny-width Llama (2 layers, hidden 256, 4 query / 2 kv heads of 64 dims, random weights: the
cost of attention does not depend on the values) runs one forward over random tokens at each
length; each method's budget is set per length so that it computes `--density` of the key
blocks dense causal attention computes (the density each run really had is measured from its
layouts and reported). Also times the attention op alone (one layer's shapes) against
`scaled_dot_product_attention(is_causal=True)`. Dense timings and the attention-free floor's (the
same model whose attention returns V) are taken before and after the methods at each length;
ratios use their minimum. Writes speed.json, speed.md and speed.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from attnpatch import patch_model, patched_methods, unpatch_model
from attnpatch.evaluation.floor import attention_free
from attnpatch.evaluation.report import environment
from attnpatch.evaluation.speed import best_seconds, style_speedup_axes
from attnpatch.ops.block_sparse import block_sparse_attention
from attnpatch.ops.block_selection import block_topk
from attnpatch.ops.sparse_patterns import a_shape

METHODS = ("a_shape", "block_topk", "bigbird", "star", "vertical_slash", "seer_gate")


def tiny_wide_llama(max_length: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_length,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


def budget_params(method: str, length: int, block: int, density: float) -> dict:
    """Parameters that make `method` compute about `density` of the causal key blocks at `length`."""
    nk = -(-length // block)
    kept = max(1, round(density * (nk + 1) / 2))  # mean causal row has (nk + 1) / 2 blocks
    if method == "a_shape":
        return {"block_size": block, "sink_blocks": 1, "local_blocks": max(1, kept - 1)}
    if method in ("block_topk", "seer_gate"):  # the sink block, the diagonal, and the chosen ones
        return {"block_size": block, "top_k": max(0, kept - 2)}
    if method == "bigbird":
        window = max(0, kept // 2 - 1)
        return {"block_size": block, "window_blocks": window, "global_blocks": 1,
                "random_blocks": max(0, kept - window - 2)}
    if method == "star":  # a row keeps the anchor and on average half its chunk
        return {"block_size": block, "context_blocks": max(1, 2 * (kept - 1)), "anchor_blocks": 1,
                "query_tokens": block}
    if method == "vertical_slash":  # half the budget as columns, half as diagonals (each crosses ~2 blocks)
        return {"block_size": block, "vertical": max(1, kept // 2) * block, "slash": max(1, kept // 4)}
    raise ValueError(method)


@torch.no_grad()
def model_rows(length: int, args) -> list[dict]:
    model = tiny_wide_llama(max(args.lengths))
    ids = torch.randint(10, 1000, (1, length), generator=torch.Generator().manual_seed(length))

    def forward():
        model(input_ids=ids, use_cache=False, logits_to_keep=1)

    def floor_seconds():
        with attention_free(model):
            forward()
            return best_seconds(forward, args.repeats)

    forward()  # warm-up
    dense, floor = [best_seconds(forward, args.repeats)], [floor_seconds()]
    rows = []
    for density in args.density:
        for method in args.methods:
            params = budget_params(method, length, args.block, density)
            patch_model(model, method, **params)
            forward()
            seconds = best_seconds(forward, args.repeats)
            measured = [m.last_density for m in patched_methods(model)]
            unpatch_model(model)
            rows.append({"tokens": length, "method": method, "target_density": density, "params": params,
                         "density": sum(measured) / len(measured), "seconds": seconds})
            print(rows[-1], flush=True)
    dense.append(best_seconds(forward, args.repeats))
    floor.append(floor_seconds())
    for row in rows:
        row["dense_seconds"], row["floor_seconds"] = min(dense), min(floor)
        row["speedup"] = min(dense) / row["seconds"]
        row["vs_floor"] = row["seconds"] / min(floor)
    return [{"tokens": length, "method": "dense (SDPA)", "seconds": min(dense), "dense_runs": dense,
             "vs_floor": min(dense) / min(floor)},
            {"tokens": length, "method": "floor (attention-free)", "seconds": min(floor), "floor_runs": floor}] + rows


@torch.no_grad()
def op_rows(length: int, args) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, length, 64, generator=g)
    k, v = torch.randn(1, 2, length, 64, generator=g), torch.randn(1, 2, length, 64, generator=g)

    def dense():
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    dense()
    dense_s = best_seconds(dense, args.repeats)
    rows = [{"tokens": length, "op": "sdpa causal", "seconds": dense_s}]
    for density in args.density:
        nk = -(-length // args.block)
        kept = max(1, round(density * (nk + 1) / 2))
        layouts = {"a_shape": a_shape(length, length, args.block, causal=True, sink_blocks=1, local_blocks=kept - 1),
                   "block_topk": block_topk(q, k, args.block, causal=True, top_k=kept - 1)}
        for name, layout in layouts.items():
            def sparse():
                block_sparse_attention(q, k, v, layout, causal=True, scaling=0.125)

            sparse()
            seconds = best_seconds(sparse, args.repeats)
            rows.append({"tokens": length, "op": f"block_sparse ({name} layout)", "target_density": density,
                         "density": layout.density(length, True), "seconds": seconds,
                         "speedup": dense_s / seconds})
            print(rows[-1], flush=True)
    return rows


def markdown(results: dict) -> str:
    lines = ["## Tiny-width Llama prefill (one forward)", "",
             "| tokens | method | density (measured) | seconds | dense / method | method / floor |",
             "|---|---|---|---|---|---|"]
    for r in results["model"]:
        if "speedup" in r:
            lines.append(f"| {r['tokens']} | {r['method']} | {r['density']:.3f} | {r['seconds']:.3f} "
                         f"| {r['speedup']:.2f}x | {r['vs_floor']:.2f}x |")
        elif "vs_floor" in r:
            lines.append(f"| {r['tokens']} | {r['method']} | 1.000 | {r['seconds']:.3f} | 1.00x | {r['vs_floor']:.2f}x |")
        else:
            lines.append(f"| {r['tokens']} | {r['method']} | 0 | {r['seconds']:.3f} | - | 1.00x |")
    lines += ["", "## Attention op alone (1 x 4 query / 2 kv heads x 64 dims)", "",
              "| tokens | op | density | seconds | speedup vs SDPA causal |", "|---|---|---|---|---|"]
    for r in results["op"]:
        if "speedup" in r:
            lines.append(f"| {r['tokens']} | {r['op']} | {r['density']:.3f} | {r['seconds']:.3f} | {r['speedup']:.2f}x |")
        else:
            lines.append(f"| {r['tokens']} | {r['op']} | 1.000 | {r['seconds']:.3f} | 1.00x |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for density in sorted({r["target_density"] for r in results["model"] if "target_density" in r}):
        for method in results["settings"]["methods"]:
            rows = [r for r in results["model"] if r.get("method") == method and r.get("target_density") == density]
            ax.plot([r["tokens"] for r in rows], [r["speedup"] for r in rows], "o-",
                    label=f"{method} @ {density:.0%} of blocks")
    style_speedup_axes(ax, "prompt tokens", "block-sparse prefill, tiny-width Llama")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="eval/results/sparse-speed")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--density", type=float, nargs="+", default=[0.1, 0.25])
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"environment": environment(0), "settings": vars(args), "model": [], "op": []}
    for length in args.lengths:
        results["op"] += op_rows(length, args)
        results["model"] += model_rows(length, args)
        (out / "speed.json").write_text(json.dumps(results, indent=1))
    (out / "speed.md").write_text("# Block-sparse prefill vs dense SDPA\n\n" + markdown(results) + "\n")
    plot(results, out / "speed.png")
    print(markdown(results))


if __name__ == "__main__":
    main()
