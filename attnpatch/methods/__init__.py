"""Built-in methods, one folder per family; importing this package registers them."""

from . import kv, reference  # noqa: F401
from .heads import duo, prune  # noqa: F401
from .linear import linear, lolcats  # noqa: F401
from .sinks import act, gated, var  # noqa: F401
from .sparse import blocks, sliding_window  # noqa: F401
from .tokens import visual_token_prune  # noqa: F401
