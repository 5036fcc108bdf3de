"""Names that differ between the supported transformers versions (5.17 and later 5.x)."""

import dataclasses

from transformers.modeling_outputs import BaseModelOutputWithPast

# The outputs' cache field has the installed version's name: later versions warn when given or asked for the old one.
_OUTPUT_FIELDS = {field.name for field in dataclasses.fields(BaseModelOutputWithPast)}
CACHE_OUTPUT_FIELD = "cache" if "cache" in _OUTPUT_FIELDS else "past_key_values"
