"""Everything generation needs beyond the model's forward: the caches and the accessors the layers use on them,
prompt-state files, decode steps replayed as CUDA graphs, the generate hooks of the causal LM, and the shims for
the differences between transformers versions."""

from .cache import CACHE_ARGUMENT_NAMES, M2RNNCache, M2RNNStaticCache, as_m2rnn_cache
from .compat import CACHE_OUTPUT_FIELD
from .mixin import M2RNNGenerationMixin
from .prompt_state import load_prompt_state, save_prompt_state

__all__ = [
    "CACHE_ARGUMENT_NAMES",
    "CACHE_OUTPUT_FIELD",
    "M2RNNCache",
    "M2RNNGenerationMixin",
    "M2RNNStaticCache",
    "as_m2rnn_cache",
    "load_prompt_state",
    "save_prompt_state",
]
