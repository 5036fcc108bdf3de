"""The generation cache: transformers' DynamicCache, which keeps a LinearAttentionLayer (conv window and
float32 state) per M2RNN layer and a key/value layer per attention layer, plus a token count."""

from transformers import DynamicCache


class M2RNNCache(DynamicCache):
    """A `DynamicCache` that also counts the tokens it has seen.

    Attention layers know the cache length from their keys; a model made only of M2RNN layers has no
    such layer, and `DynamicCache.get_seq_length` would raise. The model calls `advance` once per forward.
    """

    def __init__(self, config, **kwargs):
        super().__init__(config=config, **kwargs)
        self.has_attention_layers = "full_attention" in config.layer_types
        self.seen_tokens = 0

    def advance(self, num_tokens: int) -> None:
        self.seen_tokens += num_tokens

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return super().get_seq_length(layer_idx) if self.has_attention_layers else self.seen_tokens

    @property
    def is_compileable(self) -> bool:
        # Dynamic by design: generate must not auto-compile decode steps over it.
        return False

    def reset(self):
        super().reset()
        self.seen_tokens = 0
