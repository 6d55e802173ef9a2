"""lm-evaluation-harness on a (patched) model object, with local tasks that run offline.

Hub tasks (piqa, arc_easy, arc_challenge, hellaswag, winogrande, lambada_openai, mmlu) go
straight to lm-eval by name. The local tasks are built from a text, seeded: `attnpatch eval` writes
them into its output folder as JSONL data plus task YAMLs; the repository's `eval/tasks/` YAMLs
build the same items on first use through lm-eval's `custom_dataset` (`task_dataset`). Both are
loaded through lm-eval's TaskManager(include_path=...):

- attnpatch_cloze: last-word cloze. Context = a sentence without its last word; the model is
  right when the last word is its greedy continuation (loglikelihood task, metric acc).
- attnpatch_next_sentence: 4-way multiple choice. Context = a sentence; choices = the sentence
  that really follows it and three sentences from elsewhere (metrics acc, acc_norm).
"""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path

STANDARD_TASKS = {
    "piqa": 0, "arc_easy": 0, "arc_challenge": 0, "hellaswag": 0, "winogrande": 0, "lambada_openai": 0, "mmlu": 5,
}
LOCAL_TASKS = ("attnpatch_cloze", "attnpatch_next_sentence")

_CLOZE_YAML = """task: attnpatch_cloze
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_dir}/cloze.jsonl
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: " {{{{target}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

_NEXT_SENTENCE_YAML = """task: attnpatch_next_sentence
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_dir}/next_sentence.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

TEMPLATES = {"attnpatch_cloze.yaml": _CLOZE_YAML, "attnpatch_next_sentence.yaml": _NEXT_SENTENCE_YAML}


def _clean(text: str) -> str:
    """WikiText's tokenised form back to plain prose (' @-@ ' -> '-', ' , ' -> ', ', ...)."""
    text = re.sub(r" @(.)@ ", r"\1", text)
    text = re.sub(r" ([.,;:!?%)\]'])", r"\1", text)
    text = re.sub(r"([(\[$]) ", r"\1", text)
    return re.sub(r"\s+", " ", text).strip()


def sentences(text: str, min_words: int = 8, max_words: int = 40) -> list[str]:
    """Plain sentences of a reasonable length, without headings or <unk> tokens."""
    found = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("="):
            continue
        for sentence in re.split(r"(?<=[.!?])\s+", _clean(line)):
            words = sentence.split()
            if "<unk>" not in sentence and min_words <= len(words) <= max_words and sentence[-1] in ".!?":
                found.append(sentence)
    return found


def make_cloze_items(text: str, count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    pool = [s for s in sentences(text) if re.fullmatch(r"[A-Za-z]{3,}", s.split()[-1][:-1])]
    rng.shuffle(pool)
    items = []
    for s in pool[:count]:
        words = s[:-1].split()  # drop the final punctuation
        items.append({"context": " ".join(words[:-1]), "target": words[-1]})
    return items


def make_next_sentence_items(text: str, count: int, seed: int = 0, choices: int = 4) -> list[dict]:
    rng = random.Random(seed)
    ordered = sentences(text)
    if len(ordered) < choices + 1:
        raise ValueError("not enough sentences in the text to build multiple-choice items")
    starts = rng.sample(range(len(ordered) - 1), min(count, len(ordered) - 1))
    items = []
    for i in starts:
        answer = ordered[i + 1]
        distractors = set()
        while len(distractors) < choices - 1:
            j = rng.randrange(len(ordered))
            if abs(j - i) > 2 and ordered[j] != answer:
                distractors.add(ordered[j])
        options = [answer, *sorted(distractors)]
        rng.shuffle(options)
        items.append({"context": ordered[i], "choices": options, "label": options.index(answer)})
    return items


def write_task_data(data_dir: str | Path, text: str, count: int = 200, seed: int = 0) -> dict[str, int]:
    """Write cloze.jsonl and next_sentence.jsonl built from `text`; returns item counts."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, items in (("cloze", make_cloze_items(text, count, seed)),
                        ("next_sentence", make_next_sentence_items(text, count, seed))):
        with open(data_dir / f"{name}.jsonl", "w") as f:
            for item in items:
                f.write(json.dumps(item) + "\n")
        counts[name] = len(items)
    return counts


def task_dataset(task: str, text: str | None = None, items: int = 200, seed: int = 0, **_):
    """A local task's items as a datasets.DatasetDict with a "test" split, built from `text` (a path
    or source for load_text; default WikiText-2 valid, else the offline fallback). lm-eval calls it
    through `custom_dataset` in eval/tasks/*.yaml, so those tasks need no preparation step."""
    from datasets import Dataset, DatasetDict

    from .data import load_text

    makers = {"attnpatch_cloze": make_cloze_items, "attnpatch_next_sentence": make_next_sentence_items}
    if task not in makers:
        raise ValueError(f"unknown local task {task!r}; known: {', '.join(makers)}")
    source, _ = load_text(text, "valid")
    return DatasetDict({"test": Dataset.from_list(makers[task](source, items, seed))})


def write_task_yamls(yaml_dir: str | Path, data_dir: str | Path) -> None:
    """The task YAMLs, pointing at `data_dir` (absolute, or relative to where lm-eval runs)."""
    for filename, template in TEMPLATES.items():
        (Path(yaml_dir) / filename).write_text(template.format(data_dir=data_dir))


def prepare_local_tasks(out_dir: str | Path, text: str, count: int = 200, seed: int = 0) -> Path:
    """Data and YAMLs of the local tasks in one folder; returns it (lm-eval's include_path)."""
    out_dir = Path(out_dir).resolve()
    write_task_data(out_dir, text, count, seed)
    write_task_yamls(out_dir, out_dir)
    return out_dir


def run_lm_eval(model, tokenizer, tasks: list[str], *, include_path: str | Path | None = None, limit: int | None = None,
                batch_size: int = 8, num_fewshot: int | None = None, seed: int = 0) -> dict:
    """Run lm-eval tasks on the model object; returns {task: {metric: value}, "_seconds": {...}}."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    results, seconds = {}, {}
    for task in tasks:
        shots = num_fewshot if num_fewshot is not None else STANDARD_TASKS.get(task)
        t0 = time.perf_counter()
        out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager, limit=limit, num_fewshot=shots,
                                      random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                      fewshot_random_seed=seed, bootstrap_iters=0, log_samples=False, verbosity="ERROR")
        seconds[task] = time.perf_counter() - t0
        for name, metrics in out["results"].items():
            results[name] = {k.split(",")[0]: v for k, v in metrics.items()
                             if isinstance(v, (int, float)) and not k.startswith("alias") and "stderr" not in k}
            # items scored: a results field in newer lm-eval releases, "n-samples" in older ones
            effective = out.get("n-samples", {}).get(name, {}).get("effective")
            if "sample_len" not in results[name] and effective is not None:
                results[name]["sample_len"] = effective
    results["_seconds"] = seconds
    return results
