"""Checkpoint converters: `python -m modeling_m2rnn.convert --from lm-engine SRC DST` (and `--to lm-engine`)."""

from .lm_engine import convert_lm_engine_checkpoint
from .to_lm_engine import export_lm_engine_checkpoint

__all__ = ["convert_lm_engine_checkpoint", "export_lm_engine_checkpoint"]
