"""lm-eval's `custom_dataset` hooks for the local tasks in this folder: the items are built on
demand (seeded) from WikiText-2 valid, or from the text named by --metadata '{"text": "PATH"}',
so `lm_eval --include_path eval/tasks --tasks attnpatch_cloze` works on first use."""

from attnpatch.evaluation.lm_tasks import task_dataset


def cloze(**metadata):
    return task_dataset("attnpatch_cloze", **metadata)


def next_sentence(**metadata):
    return task_dataset("attnpatch_next_sentence", **metadata)
