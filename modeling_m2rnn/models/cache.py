"""Generation caches: transformers' DynamicCache and StaticCache, which keep a LinearAttentionLayer (conv window
and float32 state) per M2RNN layer and a key/value layer per attention layer, plus a token count."""

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import LinearAttentionLayer

# transformers 5.17 passes the cache as `past_key_values`, later 5.x versions (5.24) as `cache`: both are accepted.
CACHE_ARGUMENT_NAMES = ("past_key_values", "cache")


class _TokenCount:
    """The number of tokens the cache has seen; the model calls `advance` once per forward. Attention layers know
    it from their keys. An M2RNN layer answers with this count: a model made only of M2RNN layers has no attention
    layer to ask (older transformers raised), and transformers 5.25 counts in a LinearAttentionLayer only what passes
    through `update_conv_state`, which the conv step kernel, conv-free layers and a loaded prompt state bypass."""

    def _init_token_count(self, config) -> None:
        self.has_attention_layers = "full_attention" in config.layer_types
        self.recurrent_layers = [layer_type != "full_attention" for layer_type in config.layer_types]

    def get_seq_length(self, layer_idx: int = 0):
        recurrent = layer_idx < len(self.recurrent_layers) and self.recurrent_layers[layer_idx]
        if self.has_attention_layers and not recurrent:
            return super().get_seq_length(layer_idx)
        return self.seen_tokens

    @property
    def is_linear(self) -> list[bool]:
        # Newer transformers (5.24) does not trim the tokens a cache already holds off generate's input when every
        # layer is recurrent, since such a cache has no length. This one has, so it asks for the trimming that
        # every other cache gets: continuing from a cache takes the full sequence, as with attention.
        return super().is_linear if self.has_attention_layers else [False] * len(self.layers)


class M2RNNCache(_TokenCount, DynamicCache):
    """The cache `generate` and the model build by default (eager decoding)."""

    def __init__(self, config, **kwargs):
        super().__init__(config=config, **kwargs)
        self._init_token_count(config)
        self.seen_tokens = 0

    def advance(self, num_tokens: int, device: torch.device) -> None:
        self.seen_tokens += num_tokens

    @property
    def is_compileable(self) -> bool:
        # Dynamic by design: generate must not auto-compile decode steps over it.
        return False

    def reset(self) -> None:
        super().reset()
        self.seen_tokens = 0


class M2RNNStaticCache(_TokenCount, StaticCache):
    """`cache_implementation="static"`: fixed shapes and addresses, so a compiled decode step replays as a CUDA
    graph. The token count is a tensor updated in place, as StaticLayer's is, so decoding never recompiles."""

    def __init__(self, config, max_cache_len: int, **kwargs):
        super().__init__(config=config, max_cache_len=max_cache_len, **kwargs)
        self._init_token_count(config)
        self.seen_tokens = 0   # becomes a tensor on the model's device at the first forward (the prefill)

    def advance(self, num_tokens: int, device: torch.device) -> None:
        if not isinstance(self.seen_tokens, torch.Tensor):
            self.seen_tokens = torch.zeros((), dtype=torch.long, device=device)
            torch._dynamo.mark_static_address(self.seen_tokens)
        self.seen_tokens.add_(num_tokens)

    def reset(self) -> None:
        super().reset()
        if isinstance(self.seen_tokens, torch.Tensor):
            self.seen_tokens.zero_()

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the cache holds: what a captured decode step reads and writes in place. (Attributes named
        one by one: a generic walk over the layers took ~10x the host time, and this runs before every graph replay.)"""
        found = [self.seen_tokens]
        for layer in self.layers:
            if isinstance(layer, LinearAttentionLayer):
                found.extend(t for t in (*layer.conv_states.values(), *layer.recurrent_states.values()) if t is not None)
            elif layer.is_initialized:
                found.extend((layer.keys, layer.values, layer.cumulative_length))
        return found


def save_prompt_state(cache: M2RNNCache, path) -> None:
    """Write every layer's state after a prompt to a safetensors file: conv window and recurrent state of the
    M2RNN layers, keys and values of the attention layers, and the number of tokens seen."""
    tensors = {}
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, LinearAttentionLayer):
            if not layer.is_recurrent_states_initialized[0]:
                raise ValueError(f"layer {i} holds no state yet: run the prompt through the model with this cache first")
            tensors[f"layers.{i}.recurrent_state"] = layer.recurrent_states[0]
            if layer.is_conv_states_initialized[0]:
                tensors[f"layers.{i}.conv_state"] = layer.conv_states[0]
        else:
            tensors[f"layers.{i}.keys"], tensors[f"layers.{i}.values"] = layer.keys, layer.values
    metadata = {"seen_tokens": str(int(cache.seen_tokens)), "format": "m2rnn-prompt-state-1"}
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(path), metadata=metadata)


def load_prompt_state(path, config, device=None) -> M2RNNCache:
    """A fresh `M2RNNCache` holding the state `save_prompt_state` wrote; generation continues from it exactly as
    it would have from the original cache (pass the prompt plus the new tokens as `input_ids`)."""
    with safe_open(str(path), framework="pt", device=str(device or "cpu")) as file:
        metadata = file.metadata() or {}
        if metadata.get("format") != "m2rnn-prompt-state-1":
            raise ValueError(f"{path} is not a prompt state written by save_prompt_state")
        tensors = {name: file.get_tensor(name) for name in file.keys()}
    cache = M2RNNCache(config)
    for i, layer_type in enumerate(config.layer_types):
        if layer_type == "full_attention":
            cache.update(tensors[f"layers.{i}.keys"], tensors[f"layers.{i}.values"], i)
            continue
        if f"layers.{i}.conv_state" in tensors:
            conv_state = tensors[f"layers.{i}.conv_state"]
            cache.update_conv_state(conv_state, i, conv_kernel_size=conv_state.shape[-1])
        cache.update_recurrent_state(tensors[f"layers.{i}.recurrent_state"], i)
        cache.layers[i].has_previous_state[0] = True
    cache.seen_tokens = int(metadata["seen_tokens"])
    return cache
