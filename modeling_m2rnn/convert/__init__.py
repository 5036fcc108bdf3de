"""Checkpoint converters: `python -m modeling_m2rnn.convert --from lm-engine SRC DST`."""

from .lm_engine import convert_lm_engine_checkpoint

__all__ = ["convert_lm_engine_checkpoint"]
