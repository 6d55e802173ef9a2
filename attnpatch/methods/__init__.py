"""Built-in methods; importing this package registers them."""

from . import kv, linear, lolcats, reference, sliding, sparse  # noqa: F401
