"""Generate the data of the local lm-eval tasks in eval/tasks/ from ../shared/data text.

    python eval/make_tasks.py                    # WikiText-2 valid -> eval/tasks/data/*.jsonl
    lm_eval --model hf --model_args pretrained=PATH --include_path eval/tasks \
            --tasks attnpatch_cloze,attnpatch_next_sentence      # run from the repository root

The YAMLs in eval/tasks/ point at eval/tasks/data/ relative to the repository root; the data is
generated (never committed), seeded, so every run scores the same items. `attnpatch eval` does
the same on its own into its output folder.
"""

import argparse
from pathlib import Path

from attnpatch.evaluation.data import load_text
from attnpatch.evaluation.lm_tasks import write_task_data, write_task_yamls

HERE = Path(__file__).resolve().parent


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", default=None, help="source text (default: WikiText-2 valid, else the offline fallback)")
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--yamls", action="store_true", help="also rewrite the YAMLs (they are committed)")
    args = ap.parse_args()
    text, what = load_text(args.text, "valid")
    counts = write_task_data(HERE / "tasks" / "data", text, args.items, args.seed)
    if args.yamls:
        write_task_yamls(HERE / "tasks", "eval/tasks/data")
    print(f"wrote {counts} items from {what} to {HERE / 'tasks' / 'data'}")


if __name__ == "__main__":
    main()
