"""Built-in methods, one folder per family (a family's base class holds what its methods share).
A method is one file: a `Method` subclass that sets `name` (and family, summary, params, paper);
the registry (attnpatch/registry.py) finds it by scanning this package, so nothing here lists them."""
