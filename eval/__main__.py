"""python -m eval list | run NAME [--dry-run]: the committed results and the commands that regenerate them."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "eval" / "results"
COMMAND_FILE = "COMMAND.sh"


def results() -> dict[str, Path]:
    """{result name: its COMMAND.sh} for every folder under eval/results."""
    return {folder.name: folder / COMMAND_FILE for folder in sorted(RESULTS.iterdir()) if folder.is_dir()}


def commands(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def about(path: Path) -> str:
    """The notes of a COMMAND.sh (its comments after the first line), as one line."""
    notes = [line[2:] for line in path.read_text().splitlines()[1:] if line.startswith("# ")]
    return " ".join(notes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="every result folder and the command that regenerates it")
    run = sub.add_parser("run", help="regenerate one result folder")
    run.add_argument("name")
    run.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    args = parser.parse_args(argv)
    known = results()
    if args.command == "list":
        width = max(map(len, known))
        for name, path in known.items():
            steps = commands(path) if path.is_file() else []
            first = steps[0] if steps else "(no COMMAND.sh)"
            more = f"  (+{len(steps) - 1} more steps)" if len(steps) > 1 else ""
            print(f"{name:<{width}}  {first}{more}")
        return 0
    if args.name not in known:
        print(f"python -m eval: no result {args.name!r}; known: {', '.join(known)}", file=sys.stderr)
        return 2
    path = known[args.name]
    if args.dry_run:
        print(f"# {about(path)}")
        print("\n".join(commands(path)))
        return 0
    return subprocess.run(["bash", "-euo", "pipefail", str(path)], cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main())
