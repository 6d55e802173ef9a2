"""report.md of the before-vs-after grid: a section per metric, ratios to dense measured in the same run."""

from __future__ import annotations

VISION_METRICS = ("vit", "clip", "dit", "llava")


def _ratio(value, base):
    return value / base if base else float("nan")


def render_markdown(report: dict) -> str:
    """report.md: one section per metric that ran, in a fixed order, ratios to dense throughout."""
    env = report["environment"]
    lines = [f"# attnpatch before-vs-after: {report['model']}", "",
             f"{env['date']} · torch {env['torch']} · transformers {env['transformers']} · {env['device']} "
             f"({env.get('gpu', env['cpu'])}), {env['threads']} threads · seed {env['seed']}", ""]
    sections = [("ppl", _perplexity), ("decode_ppl", _decoding_perplexity), ("lm_eval", _lm_eval),
                ("passkey", lambda report: _retrieval(report, "passkey")),
                ("needle", lambda report: _retrieval(report, "needle")), ("sinks", _sinks), ("speed", _speed)]
    sections += [(metric, lambda report, metric=metric: _vision(report, metric)) for metric in VISION_METRICS]
    for metric, section in sections:
        if metric in report["metrics"]:
            lines += section(report) + [""]
    lines += _time_per_metric(report) + [""]
    return "\n".join(lines)


def _perplexity(report: dict) -> list[str]:
    """Strided perplexity per method."""
    r, specs, lines = report["results"], report["methods"], []
    s = report["settings"]
    lines += [f"## Perplexity ({report['text']}; {s['ppl_window']}-token windows, stride "
              f"{s['ppl_stride'] or s['ppl_window']})", "", "| method | perplexity | vs dense | tokens | tokens/s |",
              "|---|---|---|---|---|"]
    base = r["dense"]["ppl"]["perplexity"]
    for spec in specs:
        p = r[spec]["ppl"]
        lines.append(f"| {spec} | {p['perplexity']:.2f} | {_ratio(p['perplexity'], base):.3f}x | {p['tokens']} | "
                     f"{p['tokens_per_s']:.0f} |")
    return lines


def _decoding_perplexity(report: dict) -> list[str]:
    """Perplexity through the cache, with the cache's bytes and decode speed."""
    r, specs, lines = report["results"], report["methods"], []
    s = report["settings"]
    lines += [f"## Decoding perplexity ({s['decode_prefill']} tokens prefilled, then token by token to "
              f"{s['decode_tokens']} through the cache; tokens after the prefill scored)", "",
              "| method | perplexity | vs dense | KV bytes at end | KV vs dense | decode tok/s | vs dense |",
              "|---|---|---|---|---|---|---|"]
    base = r["dense"]["decode_ppl"]
    for spec in specs:
        p = r[spec]["decode_ppl"]
        lines.append(f"| {spec} | {p['perplexity']:.2f} | {_ratio(p['perplexity'], base['perplexity']):.3f}x | "
                     f"{p['cache_bytes']:,} | {_ratio(p['cache_bytes'], base['cache_bytes']):.3f} | "
                     f"{p['decode_tokens_per_s']:.1f} | "
                     f"{_ratio(p['decode_tokens_per_s'], base['decode_tokens_per_s']):.2f}x |")
    return lines


def _lm_eval(report: dict) -> list[str]:
    """lm-eval accuracies per task."""
    r, specs, lines = report["results"], report["methods"], []
    tasks = [t for t in r["dense"]["lm_eval"] if not t.startswith("_")]
    lines += ["## lm-eval tasks (accuracy; acc_norm where the task has it)", "",
              "| method | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for spec in specs:
        cells = []
        for task in tasks:
            m = r[spec]["lm_eval"].get(task, {})
            cell = f"{m.get('acc', float('nan')):.3f}"
            if "acc_norm" in m:
                cell += f" / {m['acc_norm']:.3f}"
            cells.append(cell)
        lines.append(f"| {spec} | " + " | ".join(cells) + " |")
    return lines


def _retrieval(report: dict, kind: str) -> list[str]:
    """Passkey or needle accuracy per method and length."""
    r, specs, lines = report["results"], report["methods"], []
    lengths = list(r["dense"][kind]["grid"])
    lines += [f"## {kind} retrieval (accuracy over depths {report['settings']['retrieval_depths']})", "",
              "| method | all | " + " | ".join(f"{length} tokens" for length in lengths) + " |",
              "|---|---|" + "---|" * len(lengths)]
    for spec in specs:
        g = r[spec][kind]["grid"]
        cells = [f"{sum(g[length].values()) / len(g[length]):.2f}" for length in lengths]
        lines.append(f"| {spec} | {r[spec][kind]['accuracy']:.2f} | " + " | ".join(cells) + " |")
    return lines


def _sinks(report: dict) -> list[str]:
    """The sink inspector's summary per method."""
    r, specs, lines = report["results"], report["methods"], []
    lines += ["## Attention sinks (sink inspector, 4 x 512 tokens)", "",
              "| method | first-token mass | heads > 0.5 on it | other-sink mass | largest activation (x median) | plot |",
              "|---|---|---|---|---|---|"]
    for spec in specs:
        k = r[spec]["sinks"]
        lines.append(f"| {spec} | {k['first_token_mass']:.3f} | {k['heads_over_half']} of {k['heads']} | "
                     f"{k['other_sink_mass']:.3f} | {k['max_activation']:.3g} ({k['max_activation_vs_median']:.0f}x) | "
                     f"{k['plot']} |")
    return lines


def _speed(report: dict) -> list[str]:
    """Prefill latency per length and decode speed, each as dense / method (speed-up) and method /
    floor (time over the attention-free model), with KV bytes and peak memory."""
    r, specs, lines = report["results"], report["methods"], []
    dense = r["dense"]["speed"]
    floor = dense.get("floor")
    lengths = [row["tokens"] for row in dense["prefill"]]
    against = "dense / method, method / floor" if floor else "dense / method"
    lines += ["## Speed and memory (every ratio measured in this run)", "",
              f"Prefill: seconds ({against}: time ratios); decode: tokens/s ({against}: time per token ratios)."
              + (" The floor is the same model with attention that costs nothing (each token's output is its own "
                 "value, no cache)." if floor else ""), "",
              "| method | " + " | ".join(f"prefill {n}" for n in lengths) +
              " | prefill peak MB (RSS growth) | decode tok/s | KV bytes (vs dense) |", "|---|" + "---|" * (len(lengths) + 3)]

    def ratios(seconds, dense_seconds, floor_seconds):
        cells = f"{_ratio(dense_seconds, seconds):.2f}x"
        return f"{cells}, {_ratio(seconds, floor_seconds):.2f}x" if floor_seconds is not None else cells

    rows = [(spec, r[spec]["speed"]) for spec in specs] + ([("floor (attention-free)", floor)] if floor else [])
    for spec, sp in rows:
        cells = [f"{row['seconds']:.3f} ({ratios(row['seconds'], base['seconds'], f['seconds'] if floor else None)})"
                 for row, base, f in zip(sp["prefill"], dense["prefill"], (floor or dense)["prefill"])]
        cells.append(f"{max(row['peak_mb'] for row in sp['prefill']):.0f}")
        d = sp["decode"]
        step = 1 / d["decode_tokens_per_s"]
        cells.append(f"{d['decode_tokens_per_s']:.1f} ({ratios(step, 1 / dense['decode']['decode_tokens_per_s'], 1 / floor['decode']['decode_tokens_per_s'] if floor else None)})")
        cells.append(f"{d['kv_bytes']:,} ({_ratio(d['kv_bytes'], dense['decode']['kv_bytes']):.3f})")
        lines.append(f"| {spec} | " + " | ".join(cells) + " |")
    return lines


def _vision(report: dict, metric: str) -> list[str]:
    """A vision metric's agreement with the dense model."""
    r, specs, lines = report["results"], report["methods"], []
    keys = list(r["dense"][metric])
    lines += [f"## {metric} agreement with the dense model", "", "| method | " + " | ".join(keys) + " |",
              "|---|" + "---|" * len(keys)]
    for spec in specs:
        lines.append(f"| {spec} | " + " | ".join(f"{r[spec][metric][k]:.4g}" for k in keys) + " |")
    return lines


def _time_per_metric(report: dict) -> list[str]:
    """Seconds each metric took, per method."""
    specs, lines = report["methods"], []
    lines += ["## Time per metric (seconds, all methods)", "", "| metric | " + " | ".join(specs) + " |",
              "|---|" + "---|" * len(specs)]
    for metric, per in report["seconds"].items():
        lines.append(f"| {metric} | " + " | ".join(f"{per.get(spec, float('nan')):.1f}" for spec in specs) + " |")
    return lines
