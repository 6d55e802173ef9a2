"""save_patched / load_patched: a plain HF checkpoint plus attnpatch_config.json and the attnpatch
parameters; trainable_parameters."""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path

from torch import nn

from ..adapters import find_adapter
from ..config import PatchConfig
from ..errors import PatchError
from ..methods.base import attnpatch_entries
from ..registry import get_method
from .model_card import hub_id, write_model_card
from .patching import _records, patch_model, patched_owner, untrained_methods

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


def _lora_merged_state_dict(model: nn.Module) -> dict | None:
    """The model's weights under their own names with peft's adapters (LoRA) merged into them, for a
    model peft has wrapped; None for a model without adapter layers. The model is left as it was."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return None
    tuners = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    if not tuners:
        return None
    layers = [m for m in tuners if not m.merged]  # merged already (by the user): left as they are
    for layer in layers:
        layer.merge()
    try:
        state = {}
        for name, tensor in model.state_dict().items():
            if is_attnpatch_key(name) or ".lora_" in name or ".original_module." in name:
                continue
            state[name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")] = tensor.detach().clone()
        return state
    finally:
        for layer in layers:
            layer.unmerge()


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

    owner = patched_owner(model)  # the model, the patched model inside a wrapper (peft), or around a module
    if owner is None:
        raise PatchError(f"nothing in or around this {type(model).__name__} is patched; use save_pretrained for a "
                         "plain checkpoint")
    model = owner
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    extra = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if is_attnpatch_key(k)}
    merged = _lora_merged_state_dict(model)
    with _attnpatch_modules_detached(model):  # the class's save_pretrained: the instance's warns about the patch
        type(model).save_pretrained(model, path, **({} if merged is None else {"state_dict": merged}), **save_kwargs)
    untrained = untrained_methods(model)
    if untrained:
        warnings.warn(f"save_patched: the parameters {untrained} added are still at their initial values (never "
                      "trained); the checkpoint says so. Train them with a recipe (recipes/README.md) first if that "
                      "was not the intent", stacklevel=2)
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
        "untrained": untrained,
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

    try:
        return Path(snapshot_download(str(path_or_id)))
    except Exception as error:  # noqa: BLE001 - a typo'd folder and an unreachable hub id read the same
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise FileNotFoundError(f"{str(path_or_id)!r} is not a folder here ({path.resolve()}), and the hub could not "
                                f"give it either ({type(error).__name__}: {first})") from None


def load_patched(path_or_id: str | os.PathLike, **from_pretrained_kwargs) -> nn.Module:
    """Load a checkpoint written by `save_patched` (a local folder or a hub id) with its patches."""
    from safetensors.torch import load_file

    path = _resolve_checkpoint(path_or_id)
    manifest_file = path / CONFIG_FILE
    if not manifest_file.exists():
        raise PatchError(f"{path} has no {CONFIG_FILE}; it was not written by save_patched")
    try:
        manifest = json.loads(manifest_file.read_text())
        manifest["library"], manifest["model_class"], manifest["patches"]  # noqa: B018 - the fields read below
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise PatchError(f"{manifest_file} is not a valid attnpatch checkpoint manifest ({type(error).__name__}: "
                         f"{error}); re-save the model with save_patched") from None
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
    if library == "transformers":
        model, info = model_cls.from_pretrained(str(path), output_loading_info=True, **from_pretrained_kwargs)
        unmatched = {kind: sorted(info.get(kind) or []) for kind in ("missing_keys", "unexpected_keys")}
        if any(unmatched.values()):  # transformers would initialise what is missing: silently other weights
            raise PatchError(f"{path} does not hold the weights {class_name} needs: missing {unmatched['missing_keys'][:6]}"
                             f", unexpected {unmatched['unexpected_keys'][:6]}; it was not written by save_patched from "
                             "this model (a peft-wrapped model is saved with save_patched(peft_model), which merges it)")
    else:
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
