"""A Hugging Face model card (README.md) for a patched checkpoint: what was patched, with which
parameters and on which layers, how to load it, and (from a recipe) how it was trained and scored.
Built from the checkpoint's own attnpatch_config.json, so the card cannot disagree with it."""

from __future__ import annotations

import os
from pathlib import Path

from ..registry import get_method

CARD_FILE = "README.md"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("attnpatch")
    except PackageNotFoundError:
        return "unknown"


def hub_id(name_or_path: str | None) -> str | None:
    """`name_or_path` when it names a hub repository (owner/name), None for a local folder."""
    if not name_or_path or os.path.exists(name_or_path):
        return None
    parts = name_or_path.split("/")
    return name_or_path if len(parts) == 2 and all(parts) else None


def _yaml_list(key: str, values: list[str]) -> list[str]:
    return [f"{key}:", *(f"- {v}" for v in values)]


def _patch_rows(patches: list[dict], baked: bool) -> list[str]:
    rows = []
    for patch in patches:
        method = patch["method"]
        family = get_method(method).family
        params = ", ".join(f"{k}={v}" for k, v in patch["params"].items()) or "defaults"
        layers = patch.get("layers", "all")
        layers = layers if isinstance(layers, str) else ", ".join(map(str, layers))
        towers = patch.get("towers")
        where = f"{layers}" + (f" (stacks: {', '.join(towers)})" if towers else "")
        note = " (baked into the weights)" if baked else ""
        rows.append(f"| `{method}`{note} | {family} | {where} | {params} |")
        for layer, override in sorted(patch.get("layer_params", {}).items(), key=lambda kv: int(kv[0])):
            changed = ", ".join(f"{k}={v}" for k, v in override.items())
            rows.append(f"| ↳ layer {layer} | | {layer} | {changed} |")
    return rows


def _training_lines(training: dict) -> list[str]:
    """Recipe summary (summary.json of recipes/convert.py) -> the card's training section."""
    recipe = training.get("recipe", {})
    lines = ["## Training", "", f"Trained with attnpatch's two-stage recipe ({training.get('processes', 1)} "
             f"process(es)); data: {', '.join(map(str, recipe.get('data', {}).get('train', []))) or 'see recipe'}.", "",
             "| stage | steps | training tokens | eval perplexity after |", "|---|---|---|---|"]
    for name, stage in training.get("stages", {}).items():
        history = stage.get("history") or [{}]
        tokens = history[-1].get("train_tokens", stage.get("tokens_this_run"))
        after = stage.get("eval_perplexity_after")
        lines.append(f"| {name} | {stage.get('steps', '?')} | {tokens if tokens is not None else '?'} | "
                     f"{'-' if after is None else f'{after:.2f}'} |")
    dense, untrained = training.get("dense_eval_perplexity"), training.get("untrained_eval_perplexity")
    if dense is not None:
        lines += ["", f"Eval perplexity of the base model (dense attention): {dense:.2f}"
                  + (f"; patched before training: {untrained:.2f}." if untrained is not None else ".")]
    return lines + [""]


def model_card(manifest: dict, base_model: str | None = None, training: dict | None = None,
               results: dict | None = None) -> str:
    """The card's text from a checkpoint manifest (attnpatch_config.json)."""
    patches, baked = manifest.get("patches", []), manifest.get("baked", [])
    methods = list(dict.fromkeys(p["method"] for p in patches + baked))
    families = list(dict.fromkeys(get_method(m).family for m in methods))
    library = manifest.get("library", "transformers")
    header = ["---", f"library_name: {library}"]
    if base_model:
        header.append(f"base_model: {base_model}")
    header += _yaml_list("tags", ["attnpatch", *methods, *(f"attention-{f}" for f in families)]) + ["---", ""]
    title = f"# {manifest.get('model_class', 'model')} with {', '.join(methods)} attention (attnpatch)"
    body = [title, "",
            f"Base model: {base_model or 'a local checkpoint'} ({manifest.get('model_class')}); "
            f"patched with attnpatch {_version()}.", "",
            "| method | family | layers | parameters |", "|---|---|---|---|",
            *_patch_rows(patches, False), *_patch_rows(baked, True), "",
            *([f"**Untrained**: the parameters {', '.join(manifest['untrained'])} added were saved at their initial "
               "values (never trained): this checkpoint is the patch's starting point, not a conversion.", ""]
              if manifest.get("untrained") else []),
            "## How to load", "", "```python", "from attnpatch import load_patched", "",
            'model = load_patched("PATH_OR_REPO")  # the patches and their parameters re-applied', "```", "",
            f"Plain `{library}` loads the base weights here without the patch (dense attention)"
            + (": the learned parameters live in " + f"`{manifest['parameters_file']}`." if manifest.get("parameters_file")
               else "."), ""]
    if training:
        body += _training_lines(training)
    if results:
        body += ["## Results", "", "| metric | value |", "|---|---|",
                 *(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in results.items()), ""]
    return "\n".join(header + body)


def write_model_card(path: str | os.PathLike, manifest: dict, base_model: str | None = None,
                     training: dict | None = None, results: dict | None = None) -> Path:
    """Write README.md into a checkpoint folder (save_patched calls it with the folder's manifest)."""
    card = Path(path) / CARD_FILE
    card.write_text(model_card(manifest, base_model, training, results))
    return card
