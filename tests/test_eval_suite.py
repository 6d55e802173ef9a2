"""eval/ as a suite: every committed result names the commands that regenerate it, those commands name
scripts and recipes that exist, and `python -m eval list | run NAME` finds them."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "eval" / "results"


def run_eval(*args):
    return subprocess.run([sys.executable, "-m", "eval", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_every_result_folder_has_the_commands_that_regenerate_it():
    folders = [p for p in RESULTS.iterdir() if p.is_dir()]
    assert len(folders) >= 40
    missing = [p.name for p in folders if not (p / "COMMAND.sh").is_file()]
    assert not missing, f"result folders without COMMAND.sh: {missing}"
    for folder in folders:
        text = (folder / "COMMAND.sh").read_text()
        steps = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
        assert steps, folder.name
        # every script, shell file and recipe a step names is in the repository
        for path in re.findall(r"(?:eval|recipes)/[\w/.-]+\.(?:py|sh|yaml)", text):
            assert (ROOT / path).is_file(), f"{folder.name}/COMMAND.sh names {path}, which does not exist"
        assert f"eval/results/{folder.name}" in text or folder.name == "gpu", folder.name


def test_python_m_eval_lists_and_runs_by_name():
    listed = run_eval("list")
    assert listed.returncode == 0
    names = [line.split()[0] for line in listed.stdout.splitlines()]
    assert names == sorted(p.name for p in RESULTS.iterdir() if p.is_dir())
    shown = run_eval("run", "main-job", "--dry-run")
    assert shown.returncode == 0 and "attnpatch compare --out eval/results/main-job" in shown.stdout
    unknown = run_eval("run", "nope")
    assert unknown.returncode == 2 and "no result 'nope'; known: act-smollm2" in unknown.stderr


def test_every_benchmark_script_imports_from_its_place_in_the_suite():
    """Each script's imports resolve from where it lives (eval.common, eval.gpu.*, tests/, siblings), loaded
    as a module (its main() not run), all in one process."""
    scripts = sorted((ROOT / "eval" / "benchmarks").glob("*.py")) + sorted((ROOT / "eval" / "gpu").glob("*.py"))
    scripts.remove(ROOT / "eval" / "benchmarks" / "kvpress_worker.py")  # runs in kvpress's own environment
    loader = (
        "import importlib.util, sys\n"
        "for path in sys.argv[1:]:\n"
        "    sys.path.insert(0, path.rsplit('/', 1)[0])  # as `python path` puts the script's folder first\n"
        "    spec = importlib.util.spec_from_file_location('script_' + path.rsplit('/', 1)[1][:-3], path)\n"
        "    spec.loader.exec_module(importlib.util.module_from_spec(spec))\n")
    done = subprocess.run([sys.executable, "-c", loader, *map(str, scripts)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-1500:]
