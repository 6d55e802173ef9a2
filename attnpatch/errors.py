"""Errors raised for bad input (all ValueErrors, so callers can catch them broadly), and the
one-time warning a legitimately inactive method gives."""

import warnings


class PatchError(ValueError):
    """A patch request that cannot be carried out; the message names the problem and the fix."""


class UnsupportedModelError(PatchError):
    """The model has no attention modules attnpatch knows how to route."""


_WARNED: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """A UserWarning the first time `key` is seen in this process (a method that is legitimately
    inactive for one call says so once, not at every layer and step)."""
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, UserWarning, stacklevel=3)
