"""eval/gpu/check.py in CI's CPU mode, so that the script a GPU session runs first cannot rot:
every parity row passes, every speed row is measured (floor included), the recipe writes final/."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_on_cpu_quick(tmp_path):
    """Run as a short lease runs it (`--parallel`: three processes, one merged report), so both the
    parts and the merge are what CI checks."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "eval/gpu/check.py"), "--device", "cpu", "--quick", "--parallel",
                           "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=900)
    logs = "".join((tmp_path / f"log_{part}.txt").read_text()[-1500:] for part in ("parity", "speed", "recipe")
                   if (tmp_path / f"log_{part}.txt").exists())
    assert done.returncode == 0, (done.stdout + done.stderr)[-2000:] + logs
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["parity"] and all(row["passed"] for row in result["parity"])
    assert {row["method"] for row in result["parity"]} >= {"linear", "snapkv", "kvzip", "kv_quant", "var"}
    # off a GPU `auto` runs linear's torch path, and the backends section says so
    assert [(r["method"].split(" ")[0], r["ran"], r["passed"]) for r in result["backends"]] == [
        ("linear", ["torch"], True), ("linear", ["torch"], True), ("a_shape", ["torch"], True),
        ("block_topk", ["torch"], True), ("bigbird", ["torch"], True), ("star", ["torch"], True)]
    prefill = result["speed"]["prefill"]
    assert set(prefill) == {"floor", "dense", "linear", "sliding_window", "a_shape", "block_topk", "lolcats",
                            "block_topk:backend=flex", "block_topk:query_pooling=mean"}
    assert all(len(rows) == 2 for rows in prefill.values()) and not result["speed"]["errors"]
    decode = result["speed"]["decode"]["256"]
    assert decode["floor"]["kv_bytes"] == 0 and 0 < decode["snapkv:compression=0.75"]["kv_bytes"] < decode["dense"]["kv_bytes"]
    assert result["recipe"]["passed"]
    report = (tmp_path / "report.md").read_text()
    assert report.startswith("# GPU check") and "Run with `--parallel`" in report and "exits parity 0, speed 0, recipe 0" in report
    assert "## Parity:" in report and "## Backends:" in report and "## Prefill on SmolLM2-135M" in report and "## Recipe: ok" in report
    assert (tmp_path / "prefill_time_memory.png").stat().st_size > 1000



@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_parallel_times_speed_alone_on_a_gpu(monkeypatch, tmp_path, device):
    """On a GPU `--parallel` starts the speed process only after the others have ended (their kernel
    compilations slowed its rows), with what is left of the budget; on the CPU all three run at once.
    The children are stand-ins that record when they start and end."""
    monkeypatch.syspath_prepend(str(ROOT))
    from eval.gpu import check as gpu_check

    events = []

    class Child:
        def __init__(self, command, stdout, stderr):
            self.name = Path(command[command.index("--out") + 1]).name
            events.append(("start", self.name, float(command[command.index("--budget-s") + 1])))

        def wait(self):
            events.append(("end", self.name))
            return 0

    monkeypatch.setattr(gpu_check.subprocess, "Popen", Child)
    monkeypatch.setattr(gpu_check, "merge", lambda folders, out, note: events.append(("merge", note)) or 0)
    assert gpu_check.run_parallel(argparse.Namespace(device=device, quick=True, budget_s=400.0), tmp_path) == 0
    order = [event[:2] for event in events[:-1]]
    if device == "cuda":
        assert order == [("start", "parity"), ("start", "recipe"), ("end", "parity"), ("end", "recipe"),
                         ("start", "speed"), ("end", "speed")]
        assert events[4][2] <= 400 and "then speed alone" in events[-1][1]
    else:
        assert [kind for kind, _ in order] == ["start"] * 3 + ["end"] * 3
    assert events[-1][1].endswith("exits parity 0, speed 0, recipe 0")


def test_long_prefill_sweep_runs_small(tmp_path):
    """eval/benchmarks/long_prefill.py at one short length: every row measured in the child, ratios against the
    floor, the density rows labelled with their spec, memory growth read, files written."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "eval/benchmarks/long_prefill.py"), "--lengths", "512", "--methods", "linear",
                           "--density", "0.1", "--density-methods", "a_shape", "block_topk", "block_topk:query_pooling=mean",
                           "--density-max-length", "512", "--repeats", "1", "--threads", "1", "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    rows = {row["row"]: row for row in json.loads((tmp_path / "prefill.json").read_text())["rows"]}
    variant = "block_topk (query_pooling=mean) @10% of blocks"
    assert set(rows) == {"dense", "floor", "linear", "a_shape @10% of blocks", "block_topk @10% of blocks", variant}
    assert rows["floor"]["vs_floor"] == 1.0 and all(row["seconds"] > 0 and row["peak_mb"] > 0 for row in rows.values())
    assert rows["a_shape @10% of blocks"]["spec"].startswith("a_shape:block_size=64")
    # at 512 tokens 10% is below the least block_topk layout, the sink and the diagonal block of each of the 8
    # query blocks (top_k 0): 15 of the 36 causal blocks, measured from the kernel's layouts
    assert rows["block_topk @10% of blocks"]["density"] == pytest.approx(15 / 36)
    assert rows[variant]["spec"] == rows["block_topk @10% of blocks"]["spec"] + ",query_pooling=mean"
    assert (tmp_path / "prefill.png").stat().st_size > 1000 and "| 512 | linear |" in (tmp_path / "prefill.md").read_text()
