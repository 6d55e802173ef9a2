"""The GPU check's report: report.md lines and the prefill time / memory plot."""

from __future__ import annotations

from pathlib import Path

from eval.gpu.parity import BACKEND_PROMPT, BACKEND_STEPS

def report_lines(result: dict) -> list[str]:
    env = result["environment"]
    lines = [f"# GPU check ({result['mode']}, device {result['device']})", "",
             f"torch {env['torch']}, transformers {env['transformers']}, {result.get('device_name', env['cpu'])}, "
             f"{env['date']}; `{result['command']}`", ""]
    if result.get("note"):
        lines += [result["note"] + ".", ""]
    if result.get("part_seconds"):
        lines += ["Seconds per part: " + ", ".join(f"{k} {v}" for k, v in result["part_seconds"].items())
                  + (f"; torch.compile: {result['dynamo']}" if result.get("dynamo") else ""), ""]
    rows = result["parity"]
    passed = sum(r["passed"] for r in rows)
    lines += [f"## Parity: {passed} of {len(rows)} method x model rows pass", "",
              "| method | model | float32 vs CPU | bfloat16 (tolerance) | float16 (tolerance) | result |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        halves = [f"{r[k]['error']:.4f} ({r[k]['tolerance']:.4f})" + ("" if r[k]["finite"] else " NaN/inf")
                  if k in r else "-" for k in ("bfloat16", "float16")]
        verdict = "ok" if r["passed"] else "FAIL: " + "; ".join(r.get("failures") or [r.get("error", "")])
        lines.append(f"| {r['method']} | {r['model']} | {r.get('float32_vs_cpu', float('nan')):.1e} | "
                     + " | ".join(halves) + f" | {verdict} |")
    if result.get("backends"):
        lines += ["", "## Backends: fla for linear, `auto` (FlexAttention on CUDA) for block layouts, vs the torch "
                  f"path, {BACKEND_PROMPT}-token prefill + {BACKEND_STEPS} steps, float32",
                  "", "| method | backend | ran | logits error vs torch | result |", "|---|---|---|---|---|"]
        for r in result["backends"]:
            error = f"{r['error']:.1e}" if "error" in r else r.get("exception", "-")
            lines.append(f"| {r['method']} | {r.get('backend', 'auto')} | {', '.join(r.get('ran', [])) or '-'} | {error} | "
                         f"{'ok' if r['passed'] else 'FAIL'} |")
    sp = result["speed"]
    if sp.get("prefill"):
        dense = {r["tokens"]: r for r in sp["prefill"].get("dense", [])}
        floor = {r["tokens"]: r for r in sp["prefill"].get("floor", [])}
        lengths = sorted({r["tokens"] for rows in sp["prefill"].values() for r in rows})
        lines += ["", f"## Prefill on SmolLM2-135M ({sp['dtype']}): seconds (dense / method, method / floor), peak MB",
                  "", f"Model: {sp.get('weights', 'SmolLM2-135M')}.",
                  "", "| method | " + " | ".join(str(n) for n in lengths) + " |", "|---|" + "---|" * len(lengths)]
        for spec, rows in sp["prefill"].items():
            by_length = {r["tokens"]: r for r in rows}
            cells = []
            for n in lengths:
                r = by_length.get(n)
                if r is None:
                    cells.append("-")
                    continue
                ratios = [f"{dense[n]['seconds'] / r['seconds']:.2f}x" if n in dense else "-",
                          f"{r['seconds'] / floor[n]['seconds']:.2f}x" if n in floor else "-"]
                cells.append(f"{r['seconds']:.3f} ({', '.join(ratios)}), {r['peak_mb']:.0f} MB")
            lines.append(f"| {spec} | " + " | ".join(cells) + " |")
    for context, rows in sp.get("decode", {}).items():
        d, f = rows["dense"]["decode_tokens_per_s"], rows["floor"]["decode_tokens_per_s"]
        lines += ["", f"## Decode after {context} tokens (steps alternating in one run)", "",
                  "| contender | tok/s | vs dense | step vs floor | KV bytes |", "|---|---|---|---|---|"]
        for name, r in rows.items():
            t = r["decode_tokens_per_s"]
            lines.append(f"| {name} | {t:.1f} | {t / d:.2f}x | {f / t:.2f}x | {r['kv_bytes']:,} |")
    if sp.get("errors"):
        lines += ["", "Speed rows that failed or were skipped: " + "; ".join(f"{k}: {v}" for k, v in sp["errors"].items())]
    rc = result["recipe"]
    if rc:
        lines += ["", f"## Recipe: {'ok' if rc.get('passed') else 'FAILED'} (two-stage LoLCATs on a tiny Llama, "
                  f"rc {rc.get('returncode')}, {rc.get('seconds', 0):.0f} s)"]
    return lines


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prefill = result["speed"].get("prefill", {})
    if not prefill:
        return
    fig, (time_ax, memory_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for spec, rows in prefill.items():
        if not rows:
            continue
        style = "k--" if spec == "floor" else ("k-" if spec == "dense" else "-")
        for ax, key in ((time_ax, "seconds"), (memory_ax, "peak_mb")):
            ax.plot([r["tokens"] for r in rows], [max(r[key], 1e-6) for r in rows], style, marker="o", label=spec)
    time_ax.set(xscale="log", yscale="log", xlabel="prompt tokens", ylabel="prefill seconds", title="time")
    memory_ax.set(xscale="log", yscale="log", xlabel="prompt tokens", ylabel="peak MB", title="memory")
    for ax in (time_ax, memory_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"SmolLM2-135M prefill on {result['device']} ({result['speed']['dtype']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
