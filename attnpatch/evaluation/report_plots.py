"""Plots of the before-vs-after grid."""

from __future__ import annotations

import textwrap
from pathlib import Path


def make_plots(report: dict, out_dir: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    r, specs, written = report["results"], report["methods"], []
    if "decode_ppl" in report["metrics"]:
        fig, ax = plt.subplots(figsize=(6, 4))
        base = r["dense"]["decode_ppl"]["cache_bytes"]
        for spec in specs:
            p = r[spec]["decode_ppl"]
            ax.scatter(p["cache_bytes"] / base, p["perplexity"], s=40)
            ax.annotate(spec, (p["cache_bytes"] / base, p["perplexity"]), fontsize=7, xytext=(4, 4),
                        textcoords="offset points")
        ax.set_xlabel("KV-cache bytes / dense (measured)")
        ax.set_ylabel("decoding perplexity")
        ax.set_yscale("log")
        ax.set_title("quality vs compression")
        fig.tight_layout()
        written.append(out_dir / "quality_vs_compression.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    if "ppl" in report["metrics"]:
        fig, ax = plt.subplots(figsize=(6, 0.5 + 0.45 * len(specs)))
        ax.barh(specs, [r[s]["ppl"]["perplexity"] for s in specs])
        ax.set_xscale("log")
        ax.set_xlabel("perplexity (log)")
        ax.invert_yaxis()
        fig.tight_layout()
        written.append(out_dir / "perplexity.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    if "speed" in report["metrics"]:
        fig, ax = plt.subplots(figsize=(6, 4))
        for spec in specs:
            rows = r[spec]["speed"]["prefill"]
            ax.plot([x["tokens"] for x in rows], [x["seconds"] for x in rows], marker="o", label=spec)
        floor = r["dense"]["speed"].get("floor")
        if floor:
            rows = floor["prefill"]
            ax.plot([x["tokens"] for x in rows], [x["seconds"] for x in rows], "k--", marker="x",
                    label="floor (attention-free)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("prefill seconds")
        ax.set_title("latency vs length")
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(out_dir / "latency_vs_length.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    for kind in ("passkey", "needle"):
        if kind not in report["metrics"]:
            continue
        columns = min(len(specs), 6)
        rows = -(-len(specs) // columns)
        fig, axes = plt.subplots(rows, columns, figsize=(2.4 * columns + 1, 2.9 * rows), squeeze=False,
                                 constrained_layout=True)
        for ax in axes.flat[len(specs):]:
            ax.axis("off")
        for ax, spec in zip(axes.flat, specs):
            grid = r[spec][kind]["grid"]
            lengths = list(grid)
            depths = list(grid[lengths[0]])
            data = [[grid[length][d] for length in lengths] for d in depths]
            image = ax.imshow(data, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            ax.set_xticks(range(len(lengths)), lengths, fontsize=7)
            ax.set_yticks(range(len(depths)), [f"{float(d):.2f}" for d in depths], fontsize=7)
            ax.set_title("\n".join(textwrap.wrap(spec.replace(":", ": ").replace(",", ", "), 24)), fontsize=7)
            ax.set_xlabel("tokens", fontsize=7)
        for row in axes:
            row[0].set_ylabel("needle depth", fontsize=7)
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8)
        written.append(out_dir / f"{kind}_heatmap.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written
