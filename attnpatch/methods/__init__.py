"""Built-in methods; importing this package registers them."""

from . import kv, linear, lolcats, reference, sliding  # noqa: F401
