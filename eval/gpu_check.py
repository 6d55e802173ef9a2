"""The GPU check: what a session lent a GPU runs first, and what CI runs on CPU so that it cannot rot.

    python eval/gpu_check.py                          # a GPU machine: CUDA, 8k-128k tokens (~7 min on one H200)
    python eval/gpu_check.py --parallel --budget-s 400 --out $OUT/gpu   # a short lease: ~5 min, 6 files
    python eval/gpu_check.py --device cpu --quick     # CI: the same code paths at small sizes (~2 min, 2 cores)

1. parity: every method of the test matrix (tests/test_matrix.py CASES) on its tiny models (Llama,
   ViT, Llava): float32 on the device against float32 on the CPU, then bfloat16 and float16 on the
   device: no NaN/inf and within the matrix's tolerance of the device's float32 output (3x the
   unpatched model's own half-precision error; the matrix's wider bound for discrete-choice methods).
2. speed on SmolLM2-135M (bfloat16 on CUDA, float32 on CPU): prefill latency and peak memory per
   length for dense SDPA, the attention-free floor and the sparse and linear methods (last logits
   only; the block-sparse methods on both backends, FlexAttention and the torch kernel), and decode
   tokens/s after a prefill with every contender's steps alternating in one run.
3. a recipe: a two-stage LoLCATs conversion of a tiny Llama through `accelerate launch` on the device.

`linear`'s flash-linear-attention backend (`backend=fla`; `auto` is its torch path, measured faster)
runs when `fla` imports (the device machine reaches no package index: carry the wheels
`eval/gpu_wheels.sh` downloads, fla-core's among them; eval/results/README.md, "On a GPU", gives the
steps). Part 1 then holds it to the torch path (`backends` in the report) and part 2 times `linear` on both.

Writes report.md, results.json and speed plots into --out (default eval/results/gpu, or
eval/results/gpu-cpu-quick for --device cpu --quick) after every part (a run cut off by its lease
still leaves what it measured) and exits non-zero when a parity row or the recipe fails. Every part
catches its own errors, so one broken method does not hide the others; `--budget-s` skips what
would start after that many seconds, and the report names what was skipped.

Where SmolLM2's weights are not installed (the device machine: its GGUF is over what a call
carries), part 2 times the same architecture with random weights, and the report says so.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import test_matrix as matrix  # noqa: E402
import tiny_models as tm  # noqa: E402

from attnpatch import patch_model, unpatch_model  # noqa: E402
from attnpatch.config import parse_method_spec  # noqa: E402
from attnpatch.evaluation.report import environment  # noqa: E402
from attnpatch.evaluation.speed import decode_speed_side_by_side, floor_speed, prefill_latency  # noqa: E402

# float32 on another device: kernels sum in another order (and may use TF32 where allowed)
FLOAT32_TOLERANCE = 2e-3
PREFILL_METHODS = ["linear", "sliding_window", "a_shape", "block_topk", "lolcats"]
# the backends side by side: `auto` is FlexAttention for block_topk on CUDA (a_shape's span path and
# linear's torch path measured faster there) and the torch kernels elsewhere
OTHER_BACKEND = {"cuda": ["a_shape:backend=flex", "block_topk:backend=torch", "linear:backend=fla"],
                 "cpu": ["block_topk:backend=flex"]}
# settings whose speed is the question: block_topk's selection was 163 of its 630 ms per 128k forward on an
# H200 (float32 scores against every query); the mean query scores 64x fewer products
VARIANTS = ["block_topk:query_pooling=mean"]
DECODE_METHODS = ["linear", "lolcats", "snapkv:compression=0.75", "streaming:compression=0.75"]
# SmolLM2-135M's architecture (its config.json), for timing where the checkpoint is not installed
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, hidden_act="silu",
                    max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
                    bos_token_id=1, eos_token_id=2, pad_token_id=2)
# the FlexAttention kernel is compiled once per shape bucket and dtype: the backend rows' and the speed
# rows' together may pass dynamo's default of 8, after which it runs eagerly (an L x L score matrix)
FLEX_RECOMPILE_LIMIT = 128
SIZES = {"full": {"lengths": [8192, 32768, 131072], "decode_contexts": [8192, 32768], "new_tokens": 32,
                  "repeats": 2},
         "quick": {"lengths": [256, 512], "decode_contexts": [256], "new_tokens": 4, "repeats": 1}}


class Deadline:
    """Seconds left of --budget-s; a part or row that would start after it is skipped, and says so."""

    def __init__(self, seconds: float | None):
        self.end = None if seconds is None else time.monotonic() + seconds

    def passed(self) -> bool:
        return self.end is not None and time.monotonic() > self.end


SKIPPED = "skipped: past --budget-s"


def _short_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"


# ----------------------------------------------------------------------------- 1. parity


def parity(device: torch.device, half_dtypes, deadline: Deadline) -> list[dict]:
    dense_error: dict = {}

    def dense_half_error(model_name, dtype):
        if (model_name, dtype) not in dense_error:
            model = tm.build(model_name).to(device)
            reference = matrix.outputs(model, model_name, torch.float32)[0]
            got = matrix.outputs(model.to(dtype), model_name, dtype)[0]
            dense_error[(model_name, dtype)] = matrix.relative_error(got, reference)
        return dense_error[(model_name, dtype)]

    rows = []
    for name, model_name in matrix.method_model_pairs():
        row = {"method": name, "model": model_name, "passed": False}
        if deadline.passed():
            row["error"] = SKIPPED
            rows.append(row)
            continue
        try:
            model = tm.build(model_name)
            matrix.patch(model, name, model_name)
            cpu = matrix.outputs(model, model_name, torch.float32)[0]
            model.to(device)
            on_device = matrix.outputs(model, model_name, torch.float32)[0]
            row["float32_vs_cpu"] = matrix.relative_error(on_device.cpu(), cpu)
            bound = max(FLOAT32_TOLERANCE, matrix.CASES[name].half_precision_tolerance or 0.0)
            failures = [] if row["float32_vs_cpu"] <= bound else [f"float32 {row['float32_vs_cpu']:.2e} > {bound:.0e}"]
            for dtype in half_dtypes:  # each from the float32 weights (not one rounding after another)
                label = str(dtype).removeprefix("torch.")
                got = matrix.outputs(copy.deepcopy(model).to(dtype), model_name, dtype)[0]
                finite = bool(torch.isfinite(got).all())
                error = matrix.relative_error(got, on_device)
                tolerance = (matrix.CASES[name].half_precision_tolerance
                             or matrix.DENSE_ERROR_FACTOR * dense_half_error(model_name, dtype))
                row[label] = {"finite": finite, "error": error, "tolerance": tolerance}
                if not finite:
                    failures.append(f"{label}: NaN or inf")
                elif error > tolerance:
                    failures.append(f"{label} {error:.4f} > {tolerance:.4f}")
            row["passed"], row["failures"] = not failures, failures
        except Exception as exc:  # one broken method must not hide the others
            row["error"] = _short_error(exc)
            row["trace"] = traceback.format_exc(limit=6)
        rows.append(row)
        print(f"parity {name:<20} {model_name:<6} {'ok' if row['passed'] else 'FAIL ' + str(row.get('failures') or row.get('error'))}",
              flush=True)
    return rows


# the other backends against the torch path: fla for linear (by name: `auto` is torch), `auto` for the
# block layouts (FlexAttention on CUDA; 64- and 32-token blocks: the kernel tiles that SmolLM2's defaults
# and smaller blocks use)
BACKEND_ROWS = [("linear (hedgehog)", "linear", {"feature_map": "hedgehog"}, "fla"),
                ("linear (elu)", "linear", {"feature_map": "elu"}, "fla"),
                ("a_shape (64-token blocks)", "a_shape", {"block_size": 64}, "auto"),
                ("block_topk (64-token blocks)", "block_topk", {"block_size": 64, "top_k": 3}, "auto"),
                ("bigbird (32-token blocks)", "bigbird", {"block_size": 32}, "auto"),
                ("star (32-token blocks)", "star", {"block_size": 32}, "auto")]
BACKEND_PROMPT, BACKEND_STEPS = 512, 4


def backend_parity(device: torch.device) -> list[dict]:
    """Each row's other backend (flash-linear-attention for linear, `auto` for the block layouts:
    FlexAttention on CUDA) against its torch path on the device: a 512-token prefill of a tiny Llama
    and 4 decoding steps from the cache it left (the matrix's prompts are shorter than one fla chunk or
    kernel tile, so its parity rows run the torch paths). Off a GPU `auto` runs torch, and without
    flash-linear-attention linear's rows test `auto`; the rows say what ran instead of failing."""
    from attnpatch import patched_methods
    from attnpatch.ops.linear_fla import fla_kernel
    from attnpatch.runtime.cache import cache_kwargs
    from transformers import DynamicCache

    rows = []
    total = BACKEND_PROMPT + BACKEND_STEPS
    for label, method, params, other in BACKEND_ROWS:
        row = {"method": label, "passed": False}
        if other == "fla" and (device.type != "cuda" or fla_kernel() is None):
            other = "auto"
        try:
            model = tm.build("llama").to(device)
            ids = torch.randint(3, tm.V - 2, (2, total), generator=torch.Generator().manual_seed(0)).to(device)
            logits, ran = {}, {}
            for backend in ("torch", other):
                patch_model(model, method, backend=backend, **params)
                with torch.no_grad():
                    cache = DynamicCache(config=model.config)
                    out = [model(input_ids=ids[:, :BACKEND_PROMPT], **cache_kwargs(model, cache)).logits]
                    ran[backend] = sorted({m.last_backend for m in patched_methods(model)})
                    out += [model(input_ids=ids[:, t:t + 1], **cache_kwargs(model, cache)).logits
                            for t in range(BACKEND_PROMPT, total)]
                logits[backend] = torch.cat(out, dim=1).float()
                unpatch_model(model)
            row["backend"], row["ran"] = other, ran[other]
            row["error"] = matrix.relative_error(logits[other].cpu(), logits["torch"].cpu())
            row["passed"] = row["error"] <= FLOAT32_TOLERANCE and bool(torch.isfinite(logits[other]).all())
        except Exception as exc:
            row["exception"] = _short_error(exc)
        rows.append(row)
        print(f"backends {row['method']:<28} {other} ran {row.get('ran')}: {'ok' if row['passed'] else 'FAIL'} "
              f"{row.get('error', row.get('exception'))}", flush=True)
    return rows


# ----------------------------------------------------------------------------- 2. speed


def speed_model():
    """(SmolLM2-135M, what it is): the checkpoint where installed, else its architecture with random
    weights (the same shapes and arithmetic, so the same time)."""
    from attnpatch.models import load_default_model

    try:
        return load_default_model()[0], "SmolLM2-135M"
    except (FileNotFoundError, ImportError) as exc:
        from transformers import LlamaConfig, LlamaForCausalLM

        print(f"speed: SmolLM2's checkpoint is not installed ({_short_error(exc)}); timing its architecture "
              "with random weights", flush=True)
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)), "SmolLM2-135M architecture, random weights"


def speed(device: torch.device, sizes: dict, deadline: Deadline, result: dict, save) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, weights = speed_model()
    model.to(device, dtype).eval()
    result.update({"dtype": str(dtype).removeprefix("torch."), "weights": weights, "prefill": {}, "decode": {},
                   "errors": {}})
    lengths, repeats = sizes["lengths"], sizes["repeats"]
    try:
        floor = floor_speed(model, lengths, sizes["decode_contexts"][0], sizes["new_tokens"], repeats=repeats)
        result["prefill"]["floor"] = floor["prefill"]
        print("prefill floor            " + "  ".join(f"{r['tokens']}: {r['seconds']:.3f} s" for r in floor["prefill"]),
              flush=True)
    except Exception as exc:
        result["errors"]["floor"] = _short_error(exc)
    for spec in ["dense"] + PREFILL_METHODS + OTHER_BACKEND.get(device.type, []) + VARIANTS:
        rows = []
        if deadline.passed():
            result["errors"][spec] = SKIPPED
            continue
        try:
            if spec != "dense":
                patch_model(model, parse_method_spec(spec))
            for length in lengths:  # one length at a time: a length that does not fit stops that row only
                rows += prefill_latency(model, [length], repeats=repeats)
        except Exception as exc:
            result["errors"][spec] = _short_error(exc)
        finally:
            if spec != "dense":
                unpatch_model(model)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        result["prefill"][spec] = rows
        save()
        print(f"prefill {spec:<16} " + "  ".join(f"{r['tokens']}: {r['seconds']:.3f} s" for r in rows), flush=True)
    if deadline.passed():
        result["errors"]["decode"] = SKIPPED
        return result
    contenders = {"dense": model, "floor": model}
    for spec in DECODE_METHODS:
        contenders[spec] = patch_model(copy.deepcopy(model), parse_method_spec(spec))
    for context in sizes["decode_contexts"]:
        try:
            rows = decode_speed_side_by_side(contenders, context, sizes["new_tokens"], floor="floor")
            result["decode"][str(context)] = rows
            print(f"decode {context}: " + "  ".join(f"{k} {v['decode_tokens_per_s']:.1f}" for k, v in rows.items()),
                  flush=True)
        except Exception as exc:
            result["errors"][f"decode {context}"] = _short_error(exc)
        save()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


# ----------------------------------------------------------------------------- 3. recipe


def recipe(device: torch.device, quick: bool) -> dict:
    work = Path(tempfile.mkdtemp(prefix="attnpatch-gpu-check-"))
    tm.build("llama").save_pretrained(work / "tiny")
    tm.tiny_tokenizer().save_pretrained(work / "tiny")
    text = " ".join(tm.word(14 + ((i * 7) % 11 + (i % 3) * 13) % (tm.V - 14)) for i in range(6000))
    (work / "train.txt").write_text(text)
    (work / "eval.txt").write_text(text[: len(text) // 6])
    steps = 4 if quick else 20
    (work / "recipe.yaml").write_text(f"""
model: {work / 'tiny'}
attention: {{method: lolcats, params: {{window: 4, chunk_size: 8}}}}
data: {{train: [{work / 'train.txt'}], eval: [{work / 'eval.txt'}], seq_len: 32, train_tokens: 4000, eval_tokens: 256}}
stage1: {{steps: {steps}, lr: 0.05, batch_size: 4, eval_every: {steps}, attention_ce: 0.5}}
stage2: {{steps: {steps}, lr: 0.01, batch_size: 4, eval_every: {steps}}}
output_dir: {work / 'out'}
""")
    launch = [sys.executable, "-m", "accelerate.commands.launch"]
    launch += (["--config_file", str(ROOT / "recipes/accelerate/cpu.yaml")] if device.type == "cpu"
               else ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"])
    t0 = time.perf_counter()
    done = subprocess.run(launch + [str(ROOT / "recipes/convert.py"), str(work / "recipe.yaml")], capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=900)
    final = work / "out" / "final"
    result = {"returncode": done.returncode, "seconds": time.perf_counter() - t0, "final_written": final.exists(),
              "log_tail": (done.stdout + done.stderr)[-1500:]}
    result["passed"] = done.returncode == 0 and result["final_written"]
    print(f"recipe: rc {done.returncode}, final/ {'written' if result['final_written'] else 'MISSING'}, "
          f"{result['seconds']:.0f} s", flush=True)
    return result


# ----------------------------------------------------------------------------- report


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


PARALLEL_PARTS = {"parity": ["speed", "recipe"], "speed": ["parity", "backends", "recipe"],
                  "recipe": ["parity", "backends", "speed"]}  # each process's --skip


def run_parallel(args, out: Path) -> int:
    """The parts as child processes (a short lease), then one merged report; each child's output goes
    to log_<part>.txt beside it. parity + backends and the recipe run side by side; on a GPU speed runs
    after them, alone: beside the backends' kernel compilations its host-bound rows read up to 1.6x slow
    (H200, 8k-32k). On the CPU (CI's check, whose timings mean nothing) all three run at once."""
    parts = Path(tempfile.mkdtemp(prefix="attnpatch-gpu-check-parts-"))
    speed_alone = torch.device(args.device).type == "cuda"
    waves = [["parity", "recipe"], ["speed"]] if speed_alone else [list(PARALLEL_PARTS)]
    started, exits = time.perf_counter(), {}
    for wave in waves:
        common = ["--device", args.device] + (["--quick"] if args.quick else [])
        if args.budget_s is not None:  # a later wave gets what is left of the lease
            common += ["--budget-s", f"{max(1.0, args.budget_s - (time.perf_counter() - started)):.0f}"]
        children = {}
        for name in wave:
            log = open(out / f"log_{name}.txt", "w")
            command = [sys.executable, __file__, *common, "--skip", *PARALLEL_PARTS[name], "--out", str(parts / name)]
            children[name] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), log)
        for name, (child, log) in children.items():
            exits[name] = child.wait()
            log.close()
            print(f"{name}: exit {exits[name]}", flush=True)
    exits = {name: exits[name] for name in PARALLEL_PARTS}
    how = ("parity + backends and the recipe in two processes at once, then speed alone" if speed_alone else
           "parity + backends, speed and the recipe in three processes at once (the speed rows shared the CPUs "
           "with the other two)")
    note = f"Run with `--parallel`: {how}; exits " + ", ".join(f"{k} {v}" for k, v in exits.items())
    code = merge([parts / name for name in PARALLEL_PARTS], out, note)
    return code or int(any(exits.values()))


def write_results(result: dict, out: Path) -> None:
    (out / "results.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (out / "report.md").write_text("\n".join(report_lines(result)) + "\n")


def exit_code(result: dict, recipe_expected: bool) -> int:
    """1 when a parity or backend row failed, or the recipe did (when it was to run)."""
    failed = [r for r in result["parity"] + result.get("backends", []) if not r["passed"]]
    return 1 if failed or (recipe_expected and not result["recipe"].get("passed")) else 0


def dynamo_counts() -> dict:
    """How often torch.compile captured and recompiled (the FlexAttention kernel is its only user here)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return {}
    return {group: dict(counters[group]) for group in ("stats", "recompiles") if counters.get(group)}


def merge(folders: list[Path], out: Path, note: str | None = None) -> int:
    """One report from runs that each did some parts (`--skip`), side by side on one device."""
    runs = [json.loads((folder / "results.json").read_text()) for folder in folders if (folder / "results.json").is_file()]
    if not runs:
        raise SystemExit(f"no results.json in {', '.join(map(str, folders))}")
    result = {**runs[0], "command": "; ".join(run["command"] for run in runs), "part_seconds": {}, "dynamo": {}}
    for run in runs:
        result["part_seconds"].update(run.get("part_seconds", {}))
        for key in ("parity", "backends", "speed", "recipe"):
            if run.get(key):
                result[key] = run[key]
        for group, counts in run.get("dynamo", {}).items():
            for name, count in counts.items():
                result["dynamo"].setdefault(group, {})[name] = result["dynamo"].get(group, {}).get(name, 0) + count
    result["seconds"] = max(run.get("seconds", 0) for run in runs)
    if note:
        result["note"] = note
    write_results(result, out)
    plot(result, out / "prefill_time_memory.png")
    print(f"wrote {out}/report.md from {len(runs)} runs")
    return exit_code(result, recipe_expected=bool(result["recipe"]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes (CI, or a first look)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["parity", "backends", "speed", "recipe"])
    parser.add_argument("--merge", type=Path, nargs="+", default=None, metavar="DIR",
                        help="write one report from the results.json of runs that each did some parts "
                             "(a lease short enough to run them side by side)")
    parser.add_argument("--parallel", action="store_true",
                        help="parity + backends and the recipe as two processes side by side, then speed alone "
                             "on a GPU (all three at once on the CPU), merged into one report (~5 min on one "
                             "H200 instead of ~7)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="skip the rows and parts that would start after this many seconds (a lease's end)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    mode = "quick" if args.quick else "full"
    out = args.out or ROOT / "eval" / "results" / ("gpu" if device.type == "cuda" else f"gpu-{device.type}-{mode}")
    out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        return merge(args.merge, out)
    if args.parallel:
        return run_parallel(args, out)
    halves = [torch.bfloat16, torch.float16]
    result = {"command": " ".join(["python", "eval/gpu_check.py", *sys.argv[1:]]), "mode": mode, "device": str(device),
              "environment": environment(0), "parity": [], "speed": {}, "recipe": {}, "part_seconds": {}}
    if device.type == "cuda":
        result["device_name"] = torch.cuda.get_device_name(device)
        import torch._dynamo.config as dynamo_config

        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, FLEX_RECOMPILE_LIMIT)
    deadline = Deadline(args.budget_s)
    t0 = time.perf_counter()

    def save():
        result["seconds"] = time.perf_counter() - t0
        result["dynamo"] = dynamo_counts()
        write_results(result, out)

    def part(name, run):
        if name in args.skip:
            return
        if deadline.passed():
            result["part_seconds"][name] = SKIPPED
            print(f"{name}: {SKIPPED}", flush=True)
            return
        started = time.perf_counter()
        run()
        result["part_seconds"][name] = round(time.perf_counter() - started, 1)
        save()

    part("parity", lambda: result.update(parity=parity(device, halves, deadline)))
    part("backends", lambda: result.update(backends=backend_parity(device)))
    part("recipe", lambda: result.update(recipe=recipe(device, args.quick)))
    part("speed", lambda: speed(device, SIZES[mode], deadline, result["speed"], save))
    save()
    plot(result, out / "prefill_time_memory.png")
    print(f"wrote {out}/report.md ({result['seconds']:.0f} s)")
    return exit_code(result, recipe_expected="recipe" not in args.skip)


if __name__ == "__main__":
    sys.exit(main())
