"""Names that differ between the supported transformers versions (5.17 and later 5.x)."""

import dataclasses

from transformers.modeling_outputs import BaseModelOutputWithPast

# The outputs' cache field has the installed version's name: later versions warn when given or asked for the old one.
CACHE_OUTPUT_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(BaseModelOutputWithPast)} else "past_key_values"
