"""Errors raised for bad input. All are ValueErrors so callers can catch them broadly."""


class PatchError(ValueError):
    """A patch request that cannot be carried out; the message names the problem and the fix."""


class UnsupportedModelError(PatchError):
    """The model has no attention modules attnpatch knows how to route."""
