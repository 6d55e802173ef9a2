"""seer_gate's trained gate against block_topk at the same budgets, on SmolLM2-135M.

    python eval/benchmarks/seer_smollm2.py --gate out/smollm2-seer-gate/final --out eval/results/seer-smollm2

Both choose `top_k` key blocks per 64-token query block besides the same local and sink blocks, so
they compute the same number of blocks (the measured density is reported). Rows: dense,
block_topk, seer_gate with the gate the recipe trained (recipes/smollm2_seer_gate.yaml), and
seer_gate with its untrained start (mean-pooled scoring) to show what training adds. Metrics:
WikiText-2 test perplexity in 2k / 4k / 8k-token windows and passkey accuracy at 2k / 4k / 8k
tokens (5 depths), as eval/runs/run_sparse_smollm2.sh measures the other sparse methods.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from attnpatch import patch_model, patched_methods, unpatch_model
from attnpatch.evaluation import retrieval
from attnpatch.evaluation.data import load_text
from attnpatch.evaluation.perplexity import windowed_perplexity
from attnpatch.evaluation.report import environment
from attnpatch.models import load_model


def gate_parameters(folder: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(str(folder / "attnpatch_params.safetensors")).items() if "attnpatch_gate" in k}


def rows(budgets: list[tuple[int, int]], gate: dict) -> list[tuple[str, str | None, dict, dict | None]]:
    """(label, method, params, gate state) per row."""
    out = [("dense", None, {}, None)]
    for top_k, local in budgets:
        params = {"block_size": 64, "top_k": top_k, "local_blocks": local, "sink_blocks": 1}
        out += [(f"block_topk:top_k={top_k},local_blocks={local}", "block_topk", params, None),
                (f"seer_gate:top_k={top_k},local_blocks={local} (trained)", "seer_gate", params, gate),
                (f"seer_gate:top_k={top_k},local_blocks={local} (untrained start)", "seer_gate", params, None)]
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gate", default="out/smollm2-seer-gate/final")
    parser.add_argument("--out", default="eval/results/seer-smollm2")
    parser.add_argument("--windows", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--ppl-tokens", type=int, default=8192)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--budgets", nargs="+", default=["2,2", "6,2"], help="top_k,local_blocks pairs")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model, tokenizer = load_model("smollm2-135m")
    model.eval()
    text, source = load_text(None, "test")
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    cases = retrieval.make_cases(tokenizer, "passkey", args.lengths, args.depths, 1, 0)
    budgets = [tuple(int(x) for x in b.split(",")) for b in args.budgets]
    results = {"environment": environment(0), "settings": vars(args), "text": source, "rows": []}
    for label, method, params, gate in rows(budgets, gate_parameters(Path(args.gate))):
        if method:
            patch_model(model, method, **params)
            if gate is not None:
                missing = model.load_state_dict(gate, strict=False)
                assert not missing.unexpected_keys, missing.unexpected_keys
        row = {"label": label, "ppl": {}, "density": {}}
        for window in args.windows:
            measured = windowed_perplexity(model, ids, window, max_tokens=args.ppl_tokens, desc=f"{label} {window}")
            row["ppl"][window] = measured.perplexity
            if method:
                densities = [m.last_density for m in patched_methods(model) if m.last_density is not None]
                row["density"][window] = sum(densities) / len(densities)
        row["passkey"] = retrieval.evaluate_retrieval(model, tokenizer, cases).as_dict()
        if method:
            unpatch_model(model)
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "report.md").write_text(markdown(results))
    print(markdown(results))


def markdown(results: dict) -> str:
    windows = results["settings"]["windows"]
    dense = results["rows"][0]
    lines = ["# seer_gate vs block_topk on SmolLM2-135M (64-token blocks, same budgets)", "",
             f"{results['environment']['date']} · perplexity: WikiText-2 test, "
             f"{results['settings']['ppl_tokens']} tokens scored per window size; passkey: "
             f"{len(results['settings']['depths'])} depths per length", "",
             "| method | " + " | ".join(f"ppl {w} (density)" for w in windows) + " | passkey " +
             " / ".join(str(n) for n in results["settings"]["lengths"]) + " |",
             "|---|" + "---|" * (len(windows) + 1)]
    for row in results["rows"]:
        cells = []
        for w in windows:
            key = w if w in row["ppl"] else str(w)
            ratio = row["ppl"][key] / dense["ppl"][key]
            density = row["density"].get(key) if row["density"] else None
            cells.append(f"{row['ppl'][key]:.2f} ({ratio:.2f}x{'' if density is None else f', {density:.2f}'})")
        grid = row["passkey"]["grid"]  # {length: {depth: accuracy}}
        passkey = " / ".join(f"{sum(grid[k].values()) / len(grid[k]):.1f}" for k in sorted(grid, key=int))
        lines.append(f"| {row['label']} | " + " | ".join(cells) + f" | {passkey} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
