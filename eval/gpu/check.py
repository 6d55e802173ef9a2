"""The GPU check: what a session lent a GPU runs first, and what CI runs on CPU so that it cannot rot.

    python eval/gpu/check.py                          # a GPU machine: CUDA, 8k-128k tokens (~7 min on one H200)
    python eval/gpu/check.py --parallel --budget-s 400 --out $OUT/gpu   # a short lease: ~5 min, 6 files
    python eval/gpu/check.py --device cpu --quick     # CI: the same code paths at small sizes (~2 min, 2 cores)

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
`eval/gpu/wheels.sh` downloads, fla-core's among them; eval/results/README.md, "On a GPU", gives the
steps). Part 1 then holds it to the torch path (`backends` in the report) and part 2 times `linear` on both.

Writes report.md, results.json and speed plots into --out (default eval/results/gpu, or
eval/results/gpu-cpu-quick for --device cpu --quick) after every part (a run cut off by its lease
still leaves what it measured) and exits non-zero when a parity row or the recipe fails. Every part
catches its own errors, so one broken method does not hide the others; `--budget-s` skips what
would start after that many seconds, and the report names what was skipped.

Where SmolLM2's weights are not installed (the device machine: its GGUF is over what a call
carries), part 2 times the same architecture with random weights, and the report says so.

The parts are modules beside this one: parity.py, speed.py, recipe.py, report.py."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: eval.*

import torch  # noqa: E402

from eval.common import FLEX_RECOMPILE_LIMIT, ROOT, dynamo_counts  # noqa: E402
from eval.gpu.budget import SKIPPED, Deadline  # noqa: E402
from eval.gpu.parity import backend_parity, parity  # noqa: E402
from eval.gpu.recipe import recipe  # noqa: E402
from eval.gpu.report import plot, report_lines  # noqa: E402
from eval.gpu.speed import speed  # noqa: E402

from attnpatch.evaluation.report import environment  # noqa: E402

SIZES = {"full": {"lengths": [8192, 32768, 131072], "decode_contexts": [8192, 32768], "new_tokens": 32,
                  "repeats": 2},
         "quick": {"lengths": [256, 512], "decode_contexts": [256], "new_tokens": 4, "repeats": 1}}



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
    result = {"command": " ".join(["python", "eval/gpu/check.py", *sys.argv[1:]]), "mode": mode, "device": str(device),
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
