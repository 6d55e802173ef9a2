"""`attnpatch` command line: list methods, patch and save a model, compare methods before/after.
Each subcommand is a module here with `register(subparsers)` and `run(args)`."""

from __future__ import annotations

import argparse
import sys

from ..errors import PatchError
from . import compare, evaluate, list_methods, patch

SUBCOMMANDS = (list_methods, patch, compare, evaluate)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="attnpatch", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    for command in SUBCOMMANDS:
        command.register(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except PatchError as err:  # the user's input: one line, not a traceback
        print(f"attnpatch: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a model or file that cannot be loaded (a typo, no hub access)
        print(f"attnpatch: error: {type(err).__name__}: {str(err).strip().splitlines()[0]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
