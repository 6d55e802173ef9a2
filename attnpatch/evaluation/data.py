"""Text sources: WikiText-2 (local folder or hub), any text file, and an offline fallback."""

from __future__ import annotations

import os
from pathlib import Path

from ..models import hub_offline as _hub_offline


def fallback_text() -> tuple[str, str]:
    """English prose that ships with every CPython: the help topics of `pydoc_data` (~0.5 MB)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics)), "Python's bundled pydoc_data help topics"


def _read_wikitext_folder(path: Path, split: str) -> str | None:
    for name in (f"{split}.txt", f"wiki.{split}.tokens", f"wiki.{split}.raw"):
        if (path / name).exists():
            return (path / name).read_text(encoding="utf-8")
    return None


def load_text(source: str | None = None, split: str = "test") -> tuple[str, str]:
    """(text, description). source: None (WikiText-2 when found, else the offline fallback), a
    text file, a WikiText-2 folder, or "wikitext2" (hub, through `datasets`)."""
    if source in (None, "auto"):
        for folder in _default_wikitext_folders():
            text = _read_wikitext_folder(folder, split)
            if text:
                return text, f"WikiText-2 {split} ({folder})"
        if not _hub_offline():
            try:
                return load_text("wikitext2", split)
            except Exception:  # reachable but failing (rate limit, missing split): fall back too
                pass
        text, what = fallback_text()
        return text, f"{what} (offline and no WikiText-2 found; pass --data PATH for WikiText-2)"
    if source == "wikitext2":
        from datasets import load_dataset

        if _hub_offline():
            raise FileNotFoundError("WikiText-2 from the hub was asked for, but the hub is unreachable (or "
                                    "HF_HUB_OFFLINE is set); pass a local WikiText-2 folder or text file instead")

        data = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
        return "\n\n".join(data["text"]), f"WikiText-2 raw {split} (hub)"
    if source == "fallback":
        return fallback_text()
    path = Path(source)
    if path.is_dir():
        text = _read_wikitext_folder(path, split)
        if text is None:
            raise FileNotFoundError(f"{path} has no {split}.txt / wiki.{split}.tokens")
        return text, f"{path}/{split}"
    if path.is_file():
        return path.read_text(encoding="utf-8"), str(path)
    raise FileNotFoundError(f"no text at {source!r}: give a text file, a WikiText-2 folder, 'wikitext2' or 'fallback'")


def _default_wikitext_folders() -> list[Path]:
    folders = []
    if os.environ.get("ATTNPATCH_DATA"):
        folders.append(Path(os.environ["ATTNPATCH_DATA"]) / "wikitext-2")
    here = Path.cwd()
    folders += [here / "../shared/data/wikitext-2", here / "shared/data/wikitext-2"]
    return [f.resolve() for f in folders if f.exists()]


