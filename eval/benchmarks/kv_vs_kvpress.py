"""attnpatch's KV methods and kvpress's, side by side on the same prompts, token for token.

    python eval/benchmarks/kv_vs_kvpress.py --out eval/results/kv-vs-kvpress        # about 40 min on 2 cores

kvpress pins an older transformers, so it runs in its own virtual environment (created on first use
at --kvpress-venv with `pip install kvpress==VERSION`, torch taken from this environment) through
eval/benchmarks/kvpress_worker.py, at the same time as attnpatch runs here, one thread each.

Prompts (seeded, SmolLM2's tokenizer): passkey (repeated filler) at several lengths and depths, a
multi-key needle (four magic numbers in WikiText-2 text, one asked) and variable tracking (a value
passed along a chain of three variables), RULER-style. Accuracy: the first number of the greedy
answer equals the expected one.
- query-agnostic: the context is compressed before the question is seen; attnpatch uses
  `compress_context` + `ctx.generate`, kvpress its press around the context prefill, then the
  question at its true positions (as its pipeline does);
- query-aware: context + question (but its last token) are compressed together.
KV bytes are read from the cache tensors (attnpatch: every tensor its cache holds; kvpress: its
keys and values). Writes results.json, results.md and accuracy_vs_bytes.png into --out.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from attnpatch import compress_context
from attnpatch.analysis.retrieval_prompts import multikey_case, passkey_case, variable_tracking_case
from attnpatch.config import parse_method_spec
from attnpatch.evaluation.data import load_text
from attnpatch.evaluation.report import environment
from attnpatch.models import cache_dir, load_default_model

KVPRESS_VERSION = "0.5.5"
# attnpatch method spec -> kvpress press of the same method (None: no counterpart in the other library)
PAIRS = [("streaming", "streaming"), ("tova", "tova"), ("knorm", "knorm"), ("keydiff", "keydiff"),
         ("snapkv", "snapkv"), ("pyramidkv", "pyramidkv"), ("kvzip", "kvzip"), ("kvzip:scope=model", None),
         ("h2o", None), ("keydiff:head_adaptive=0.2", None), (None, "expected_attention"),
         (None, "adakv_expected_attention")]
QUERY_AWARE = [("snapkv", "snapkv"), ("tova", "tova")]


def build_cases(tokenizer, lengths, kinds=("passkey", "multikey", "variable_tracking"), seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    haystack = [s for s in re.split(r"(?<=[.!?])\s+", load_text(None, "valid")[0]) if len(s) > 20]
    cases = []
    for length in lengths:
        if "passkey" in kinds:
            cases += [passkey_case(tokenizer, length, depth, rng) for depth in (0.2, 0.5, 0.8)]
        if "multikey" in kinds:
            cases += [multikey_case(tokenizer, length, rng, haystack) for _ in range(2)]
        if "variable_tracking" in kinds:
            cases.append(variable_tracking_case(tokenizer, length, rng))
    out = []
    for i, case in enumerate(cases):
        context = tokenizer(case.context).input_ids
        question = tokenizer(case.question, add_special_tokens=False).input_ids
        out.append({"id": i, "kind": case.kind, "length": case.length, "depth": case.depth, "answer": case.answer,
                    "context_ids": context, "question_ids": question})
    return out


def ensure_kvpress_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import kvpress"], capture_output=True).returncode == 0:
        return python
    print(f"creating {venv} with kvpress=={KVPRESS_VERSION} (torch from this environment)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", f"kvpress=={KVPRESS_VERSION}"], check=True)
    return python


def first_number(text: str) -> str | None:
    match = re.search(r"\d+", text)
    return match.group(0) if match else None


@torch.no_grad()
def attnpatch_answer(model, tokenizer, spec: str | None, ratio: float, mode: str, case: dict, new_tokens: int):
    context, question = case["context_ids"], case["question_ids"]
    if mode == "query_aware":
        context, question = context + question[:-1], question[-1:]
    context, question = torch.tensor([context]), torch.tensor([question])
    if spec is None:  # dense: the model's own cache
        ids = torch.cat([context, question], 1)
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
        cfg = model.config
        held = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * context.shape[1] * 4
        return out[0, ids.shape[1]:].tolist(), held
    config = parse_method_spec(spec)
    config.params["compression"] = ratio
    with compress_context(model, context, config, tokenizer=tokenizer) as ctx:
        held = ctx.nbytes
        tokens = ctx.generate(question, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=tokenizer.eos_token_id)
    return tokens[0].tolist(), held


def runs_for(library: str, ratios, only=None, modes=("query_agnostic", "query_aware")) -> list[dict]:
    """The runs of one library; `only`: attnpatch method specs to keep (with their kvpress counterparts)."""
    index = 0 if library == "attnpatch" else 1
    runs = [{"method": "dense", "ratio": 0.0, "mode": "query_agnostic"}]
    for mode, pairs in (("query_agnostic", PAIRS), ("query_aware", QUERY_AWARE)):
        for pair in pairs:
            if mode not in modes or (only is not None and pair[0] not in only and pair[1] not in only):
                continue
            if pair[index] is not None:
                runs += [{"method": pair[index], "ratio": r, "mode": mode} for r in ratios]
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75, 0.875])
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--kinds", nargs="+", default=["passkey", "multikey", "variable_tracking"])
    parser.add_argument("--only", nargs="+", default=None, help="method specs to run (and their counterparts)")
    parser.add_argument("--modes", nargs="+", default=["query_agnostic", "query_aware"])
    parser.add_argument("--kvpress-venv", type=Path, default=cache_dir() / f"kvpress-{KVPRESS_VERSION}-venv")
    parser.add_argument("--out", type=Path, default=Path("eval/results/kv-vs-kvpress"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    model, tokenizer = load_default_model()
    model.eval()
    cases = build_cases(tokenizer, args.lengths, args.kinds)
    python = ensure_kvpress_venv(args.kvpress_venv)
    job = {"model": str(cache_dir() / "smollm2-135m-instruct"), "cases": cases, "new_tokens": args.new_tokens,
           "threads": 1, "runs": [{"press": r["method"], "ratio": r["ratio"], "mode": r["mode"]}
                                  for r in runs_for("kvpress", args.ratios, args.only, args.modes)]}
    (args.out / "job.json").write_text(json.dumps(job))
    worker = subprocess.Popen([python, Path(__file__).with_name("kvpress_worker.py"), args.out / "job.json",
                               args.out / "kvpress_raw.json"])
    rows = []
    for run in runs_for("attnpatch", args.ratios, args.only, args.modes):
        t0 = time.perf_counter()
        spec = None if run["method"] == "dense" else run["method"]
        for case in cases:
            tokens, held = attnpatch_answer(model, tokenizer, spec, run["ratio"], run["mode"], case, args.new_tokens)
            rows.append({**run, "library": "attnpatch", "case": case["id"], "tokens": tokens, "kv_bytes": held})
        print(f"attnpatch {run['method']} {run['ratio']} {run['mode']}: {time.perf_counter() - t0:.0f} s", flush=True)
    if worker.wait() != 0:
        raise SystemExit("the kvpress worker failed (see its output above)")
    raw = json.loads((args.out / "kvpress_raw.json").read_text())
    rows += [{"method": r["press"], "ratio": r["ratio"], "mode": r["mode"], "library": "kvpress", "case": r["case"],
              "tokens": r["tokens"], "kv_bytes": r["kv_bytes"]} for r in raw["results"]]
    by_id = {c["id"]: c for c in cases}
    for row in rows:
        row["text"] = tokenizer.decode(row["tokens"], skip_special_tokens=True)
        row["correct"] = first_number(row["text"]) == by_id[row["case"]]["answer"]
    summary = summarise(rows, cases)
    result = {"command": " ".join(["python", *sys.argv]), "environment": environment(0), "kvpress": {"version": KVPRESS_VERSION, "transformers": raw["transformers"]},
              "cases": [{k: v for k, v in c.items() if not k.endswith("_ids")} | {"tokens": len(c["context_ids"])}
                        for c in cases], "summary": summary, "rows": rows}
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    (args.out / "results.md").write_text(table(summary, args.ratios, args.modes))
    plot(summary, args.out / "accuracy_vs_bytes.png")
    print(table(summary, args.ratios, args.modes))


def summarise(rows, cases) -> list[dict]:
    dense_bytes = {}
    for row in rows:
        if row["method"] == "dense":
            dense_bytes[(row["library"], row["case"])] = row["kv_bytes"]
    groups: dict[tuple, list] = {}
    for row in rows:
        groups.setdefault((row["library"], row["method"], row["ratio"], row["mode"]), []).append(row)
    summary = []
    for (library, method, ratio, mode), members in groups.items():
        kinds = {}
        for m in members:
            kinds.setdefault(next(c["kind"] for c in cases if c["id"] == m["case"]), []).append(m["correct"])
        summary.append({"library": library, "method": method, "ratio": ratio, "mode": mode,
                        "accuracy": sum(m["correct"] for m in members) / len(members),
                        "by_task": {k: sum(v) / len(v) for k, v in kinds.items()},
                        "kv_fraction": sum(m["kv_bytes"] / dense_bytes[(library, m["case"])] for m in members) / len(members)})
    return summary


def table(summary, ratios, modes=("query_agnostic", "query_aware")) -> str:
    find = {(s["library"], s["method"], s["ratio"], s["mode"]): s for s in summary}
    dense = {lib: find.get((lib, "dense", 0.0, "query_agnostic")) for lib in ("attnpatch", "kvpress")}
    lines = [f"Dense accuracy: attnpatch {dense['attnpatch']['accuracy']:.3f}, kvpress {dense['kvpress']['accuracy']:.3f} "
             "(the same model and prompts; both libraries' dense paths).", ""]
    for mode, pairs in (("query_agnostic", PAIRS), ("query_aware", QUERY_AWARE)):
        if mode not in modes:
            continue
        pairs = [p for p in pairs if any(s["method"] in p and s["mode"] == mode for s in summary)]
        lines += [f"**{mode.replace('_', '-')}** (accuracy, attnpatch / kvpress; KV bytes as a fraction of dense)", "",
                  "| method | " + " | ".join(f"@{r}" for r in ratios) + " | KV fraction (attnpatch / kvpress) |",
                  "|---|" + "---|" * (len(ratios) + 1)]
        for ours, theirs in pairs:
            cells, fractions = [], []
            for r in ratios:
                a = find.get(("attnpatch", ours, r, mode)) if ours else None
                k = find.get(("kvpress", theirs, r, mode)) if theirs else None
                cells.append(f"{a['accuracy']:.3f}" if a else "–")
                cells[-1] += " / " + (f"{k['accuracy']:.3f}" if k else "–")
                fractions.append(f"{a['kv_fraction']:.2f}" if a else "–")
                fractions[-1] += "/" + (f"{k['kv_fraction']:.2f}" if k else "–")
            lines.append(f"| {ours or '–'} / {theirs or '–'} | " + " | ".join(cells) + " | " + " · ".join(fractions) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(summary, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    for ax, mode in zip(axes, ("query_agnostic", "query_aware")):
        for library, style in (("attnpatch", "o-"), ("kvpress", "s--")):
            methods = dict.fromkeys(s["method"] for s in summary if s["library"] == library and s["mode"] == mode
                                    and s["method"] != "dense")
            for method in methods:
                points = sorted((s["kv_fraction"], s["accuracy"]) for s in summary if s["library"] == library
                                and s["method"] == method and s["mode"] == mode)
                ax.plot(*zip(*points), style, label=f"{method} ({library})", alpha=0.85)
        for s in summary:
            if s["method"] == "dense" and s["library"] == "attnpatch":
                ax.axhline(s["accuracy"], color="gray", ls=":", label="dense")
        ax.set(xlabel="KV bytes / dense", title=mode.replace("_", "-"), ylim=(-0.05, 1.05))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (passkey, multi-key needle, variable tracking)")
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle("SmolLM2-135M: attnpatch vs kvpress, same prompts")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
