"""save_patched / load_patched: a plain HF checkpoint plus attnpatch_config.json and the attnpatch
parameters; trainable_parameters."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from torch import nn

from ..adapters import find_adapter
from ..config import PatchConfig
from ..errors import PatchError
from ..methods.base import attnpatch_entries
from ..registry import get_method
from .model_card import hub_id, write_model_card
from .patching import _records, is_patched, patch_model

CONFIG_FILE = "attnpatch_config.json"
PARAMS_FILE = "attnpatch_params.safetensors"
FORMAT_VERSION = 1


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters attnpatch added to the model (feature maps, gates, ...), by state_dict name."""
    return {name: p for name, p in model.named_parameters() if is_attnpatch_key(name)}


def is_attnpatch_key(name: str) -> bool:
    return name.startswith("attnpatch_") or ".attnpatch_" in name


@contextlib.contextmanager
def _attnpatch_modules_detached(model: nn.Module):
    """Temporarily take attnpatch's submodules, parameters and buffers out of the model (the same
    objects go back), so a checkpoint saved meanwhile holds only the base model's weights."""
    taken = []
    for module in list(model.modules()):
        for store, name in attnpatch_entries(module):
            taken.append((store, name, store.pop(name)))
    try:
        yield
    finally:
        for store, name, item in taken:
            store[name] = item


def _library(model: nn.Module) -> str:
    adapter, _ = find_adapter(model)
    return adapter.name


def save_patched(model: nn.Module, path: str | os.PathLike, *, base_model: str | None = None,
                 training: dict | None = None, results: dict | None = None, **save_kwargs) -> Path:
    """A plain HF checkpoint of the base model + attnpatch_config.json + attnpatch parameters +
    a model card (README.md: what was patched, how to load it; `training`, a recipe's summary, and
    `results`, {metric: value}, when given). `base_model`: the hub id it came from (default: the
    model config's name when that is a hub id).

    The checkpoint loads with plain transformers/diffusers (unpatched); `load_patched` re-applies
    the patches and their parameters so outputs are identical.
    """
    from safetensors.torch import save_file

    if not is_patched(model):
        raise PatchError("the model is not patched; use model.save_pretrained for a plain checkpoint")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    extra = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if is_attnpatch_key(k)}
    with _attnpatch_modules_detached(model):
        model.save_pretrained(path, **save_kwargs)
    if extra:
        save_file(extra, str(path / PARAMS_FILE))
    manifest = {
        "format_version": FORMAT_VERSION,
        "library": _library(model),
        "model_class": type(model).__name__,
        # structural patches (head pruning) are in the saved weights and config already
        "patches": [r.config.to_dict() for r in _records(model) if not r.baked],
        "baked": [r.config.to_dict() for r in _records(model) if r.baked],
        "parameters_file": PARAMS_FILE if extra else None,
    }
    (path / CONFIG_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    config = getattr(model, "config", None)
    named = getattr(config, "_name_or_path", None) if config is not None else None
    write_model_card(path, manifest, base_model or hub_id(named), training, results)
    return path


def _resolve_checkpoint(path_or_id: str | os.PathLike) -> Path:
    path = Path(path_or_id)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(path_or_id)))


def load_patched(path_or_id: str | os.PathLike, **from_pretrained_kwargs) -> nn.Module:
    """Load a checkpoint written by `save_patched` (a local folder or a hub id) with its patches."""
    from safetensors.torch import load_file

    path = _resolve_checkpoint(path_or_id)
    manifest_file = path / CONFIG_FILE
    if not manifest_file.exists():
        raise PatchError(f"{path} has no {CONFIG_FILE}; it was not written by save_patched")
    manifest = json.loads(manifest_file.read_text())
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise PatchError(f"{manifest_file} has format {manifest['format_version']}; this attnpatch reads up to {FORMAT_VERSION}")
    library, class_name = manifest["library"], manifest["model_class"]
    if library == "transformers":
        import transformers as lib
    elif library == "diffusers":
        import diffusers as lib
    else:
        raise PatchError(f"{manifest_file} names unknown library {library!r}")
    model_cls = getattr(lib, class_name, None)
    if model_cls is None:
        raise PatchError(f"{library} has no class {class_name!r}; is the installed {library} too old?")
    model = model_cls.from_pretrained(str(path), **from_pretrained_kwargs)
    _, sites = find_adapter(model)
    for method in dict.fromkeys(patch["method"] for patch in manifest.get("baked", [])):
        for patch in get_method(method).after_reload(sites):
            patch_model(model, PatchConfig.from_dict(patch))
    for patch in manifest["patches"]:
        patch_model(model, PatchConfig.from_dict(patch))
    params_file = manifest.get("parameters_file")
    if params_file:
        state = load_file(str(path / params_file))
        result = model.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            raise PatchError(f"{params_file} holds parameters the re-applied patches do not have: {result.unexpected_keys[:5]}")
        missing = [k for k in result.missing_keys if is_attnpatch_key(k)]
        if missing:
            raise PatchError(f"{params_file} lacks attnpatch parameters: {missing[:5]}")
    return model
