"""README table of SmolLM2 perplexity per sparse method and window from eval/runs/run_sparse_smollm2.sh
results (eval/results/sparse-smollm2/ppl-*/results.json).

    python eval/benchmarks/sparse_quality_table.py > eval/results/sparse-smollm2/perplexity.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(root: str = "eval/results/sparse-smollm2") -> None:
    runs = sorted(Path(root).glob("ppl-*/results.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    results = {int(p.parent.name.split("-")[1]): json.loads(p.read_text()) for p in runs}
    windows = list(results)
    methods = results[windows[0]]["methods"]
    print("| method | " + " | ".join(f"{w}-token windows" for w in windows) + " |")
    print("|---|" + "---|" * len(windows))
    for method in methods:
        cells = []
        for w in windows:
            entry = results[w]["results"].get(method, {}).get("ppl")
            dense = results[w]["results"]["dense"]["ppl"]["perplexity"]
            cells.append("-" if entry is None else f"{entry['perplexity']:.2f} ({entry['perplexity'] / dense:.2f}x)")
        print(f"| {method} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(*sys.argv[1:])
