"""Before-vs-after evaluation: perplexity, lm-eval tasks, long-context retrieval, vision, speed.

Everything here measures a model object as it is (patched or not); `report.run_grid` patches each
method setting in turn, always measuring the dense model in the same run.
"""

from .data import fallback_text, load_text
from .memory import peak_memory
from .perplexity import PerplexityResult, decoding_perplexity, windowed_perplexity

__all__ = ["PerplexityResult", "decoding_perplexity", "fallback_text", "load_text", "peak_memory",
           "windowed_perplexity"]
