"""Built-in methods; importing this package registers them."""

from . import linear, reference, sliding  # noqa: F401
