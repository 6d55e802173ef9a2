"""Built-in methods; importing this package registers them."""

from . import kv, linear, reference, sliding  # noqa: F401
