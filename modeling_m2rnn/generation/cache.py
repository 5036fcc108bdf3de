"""Generation caches: transformers' DynamicCache and StaticCache, which keep a LinearAttentionLayer (conv window
and float32 state) per M2RNN layer and a key/value layer per attention layer, plus a token count; and the accessors
through which the layers read and write a recurrent layer's part of any such cache (docs/design.md, "The cache")."""

import sys

import torch
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import LinearAttentionLayer

# transformers 5.17 passes the cache as `past_key_values`, later 5.x versions (5.24) as `cache`: both are accepted.
CACHE_ARGUMENT_NAMES = ("past_key_values", "cache")


def _recurrent_layers(config) -> list[bool]:
    """Which of the model's layers keep a recurrent state (a LinearAttentionLayer in a cache): all but attention."""
    return [layer_type != "full_attention" for layer_type in config.layer_types]


class _TokenCount:
    """The number of tokens the cache has seen; the model calls `advance` once per forward. Attention layers know
    it from their keys. An M2RNN layer answers with this count: a model made only of M2RNN layers has no attention
    layer to ask (older transformers raised), and transformers 5.25 counts in a LinearAttentionLayer only what passes
    through `update_conv_state`, which the conv step kernel, conv-free layers and a loaded prompt state bypass."""

    def _init_token_count(self, config) -> None:
        self.recurrent_layers = _recurrent_layers(config)
        self.has_attention_layers = not all(self.recurrent_layers)
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int = 0):
        recurrent = layer_idx < len(self.recurrent_layers) and self.recurrent_layers[layer_idx]
        if self.has_attention_layers and not recurrent:
            return super().get_seq_length(layer_idx)
        return self.seen_tokens

    def crop(self, tokens_to_remove: int) -> None:
        """Roll the last -`tokens_to_remove` tokens back (assisted decoding, after `activate_past_recording`): the
        attention layers forget their keys, the recurrent layers return to a recorded state (see states_to_record)."""
        super().crop(tokens_to_remove)
        if tokens_to_remove >= 0:   # (a positive count is refused by the recurrent layers in every version)
            return
        if isinstance(self.seen_tokens, torch.Tensor):
            self.seen_tokens.sub_(-tokens_to_remove)   # in place: a static cache keeps its addresses
        else:
            self.seen_tokens += tokens_to_remove

    @property
    def is_linear(self) -> list[bool]:
        # Newer transformers (5.24) does not trim the tokens a cache already holds off generate's input when every
        # layer is recurrent, since such a cache has no length. This one has, so it asks for the trimming that
        # every other cache gets: continuing from a cache takes the full sequence, as with attention.
        # (Spelled out rather than read from super(): torch.compile cannot call a parent's property.)
        return [self.has_attention_layers and isinstance(layer, LinearAttentionLayer) for layer in self.layers]


class M2RNNCache(_TokenCount, DynamicCache):
    """The cache `generate` and the model build by default (eager decoding)."""

    def __init__(self, config, **kwargs):
        super().__init__(config=config, **kwargs)
        self._init_token_count(config)

    def _init_token_count(self, config) -> None:
        super()._init_token_count(config)
        self.prompt_ids = None   # (batch, tokens) the state was built from, where a prompt-state file kept them

    def advance(self, num_tokens: int, device: torch.device) -> None:
        self.seen_tokens += num_tokens

    @property
    def is_compileable(self) -> bool:
        # Dynamic by design: generate must not auto-compile decode steps over it.
        return False

    def reset(self) -> None:
        super().reset()
        self.seen_tokens = 0
        self.prompt_ids = None


class M2RNNStaticCache(_TokenCount, StaticCache):
    """`cache_implementation="static"`: fixed shapes and addresses, so a compiled decode step replays as a CUDA
    graph. The token count is a tensor updated in place, as StaticLayer's is, so decoding never recompiles."""

    def __init__(self, config, max_cache_len: int, **kwargs):
        super().__init__(config=config, max_cache_len=max_cache_len, **kwargs)
        self._init_token_count(config)   # seen_tokens becomes a tensor on the model's device at the prefill

    def advance(self, num_tokens: int, device: torch.device) -> None:
        if not isinstance(self.seen_tokens, torch.Tensor):
            self.seen_tokens = torch.zeros((), dtype=torch.long, device=device)
            if not torch.compiler.is_compiling():   # a compiled prefill: dynamo cannot trace the marking
                torch._dynamo.mark_static_address(self.seen_tokens)
        self.seen_tokens.add_(num_tokens)

    def reset(self) -> None:
        super().reset()
        if isinstance(self.seen_tokens, torch.Tensor):
            self.seen_tokens.zero_()

    @property
    def is_croppable(self) -> bool:
        # Assisted decoding checks its drafts in forwards that write past the cache's length (a static Llama's cache
        # overflows there too): generate refuses it over a cache that cannot be cropped.
        return False

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the cache holds: what a captured decode step reads and writes in place. (Attributes named
        one by one: a generic walk over the layers took ~10x the host time, and this runs before every graph replay.)"""
        found = [self.seen_tokens]
        for layer in self.layers:
            if isinstance(layer, LinearAttentionLayer):
                states = (*layer.conv_states.values(), *layer.recurrent_states.values())
                found.extend(t for t in states if t is not None)
            elif layer.is_initialized:
                found.extend((layer.keys, layer.values, layer.cumulative_length))
        return found


def as_m2rnn_cache(cache, config):
    """`cache` as one of ours: a DynamicCache or StaticCache that the caller or generate built from the model's config
    becomes an M2RNNCache or M2RNNStaticCache in place (it then counts tokens, see _TokenCount), so that the object
    the caller holds is the one the model fills; ours, None and other kinds pass unchanged. Raises ValueError for a
    cache whose layers are not the model's, one holding tokens it did not count, and an offloading one."""
    kind = type(cache)
    if kind not in (DynamicCache, StaticCache):
        return cache
    recurrent = _recurrent_layers(config)
    if len(cache.layers) != len(recurrent) or any(
        is_recurrent != isinstance(layer, LinearAttentionLayer) for is_recurrent, layer in zip(recurrent, cache.layers)
    ):
        raise ValueError(
            f"the {kind.__name__} was not built for this model's layers {config.layer_types}: build it with "
            f"`{kind.__name__}(config=model.config, ...)`, or use modeling_m2rnn.M2RNNCache(model.config)"
        )
    if getattr(cache, "offloading", False):
        raise ValueError("offloading caches (cache_implementation='offloaded' or 'offloaded_static') are not supported "
                         "by M2RNN models: their layers read the cached state in place")
    if any(layer.has_previous_state[0] if isinstance(layer, LinearAttentionLayer) else layer.get_seq_length() > 0
           for layer in cache.layers):
        raise ValueError(
            f"the {kind.__name__} already holds tokens this model did not count: fill a cache with this model only "
            "(a forward or generate counts them from the first token), or start from an empty one"
        )
    cache.__class__ = M2RNNCache if kind is DynamicCache else M2RNNStaticCache
    cache._init_token_count(config)
    return cache


# The accessors: a layer reads and writes its conv window and state only through these, never through the cache
# layers' internals, so that the cache's layout is this module's business. Readers take `cache=None` (no cache).


def conv_state(cache, layer_idx: int) -> torch.Tensor | None:
    """The cached conv window (B, C, k) of layer `layer_idx`: its last k real inputs; None before the first one."""
    if cache is None:
        return None
    layer = cache.layers[layer_idx]
    return layer.conv_states[0] if layer.is_conv_states_initialized[0] else None


def recurrent_state(cache, layer_idx: int) -> torch.Tensor | None:
    """The cached float32 state (B, N, K, V) of layer `layer_idx`; None before the first forward."""
    if cache is None:
        return None
    layer = cache.layers[layer_idx]
    return layer.recurrent_states[0] if layer.is_recurrent_states_initialized[0] else None


def states_to_record(cache, layer_idx: int) -> int:
    """0 unless the cache records the past of layer `layer_idx` so that generate can roll it back (assisted decoding,
    transformers 5.25 on); then how many per-step states a forward must hand `update_recurrent_state`, the last of
    its steps' states: one more than the most steps a roll-back removes (every step's where the cache does not say)."""
    layer = cache.layers[layer_idx] if cache is not None else None
    if not getattr(layer, "record_past", False):
        return 0
    keep = getattr(layer, "recurrent_states_to_keep", None)
    return sys.maxsize if keep is None else keep + 1


def has_previous_state(cache, layer_idx: int) -> bool:
    """Whether layer `layer_idx` has seen tokens, so that the next forward continues from its cache."""
    return cache is not None and bool(cache.layers[layer_idx].has_previous_state[0])


def update_conv_state(cache, layer_idx: int, x_bct: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Append the inputs x_bct (B, C, T) to the cached window and keep the last `kernel_size` of them; returns the
    cached inputs before x_bct followed by x_bct (B, C, ≥ T), the context `causal_conv1d` reads."""
    return cache.update_conv_state(x_bct, layer_idx, conv_kernel_size=kernel_size)


def set_conv_state(cache, layer_idx: int, window: torch.Tensor) -> None:
    """Overwrite the cached window with `window` (B, C, k), in place (a static cache keeps its addresses): with
    padding among the last k positions, the window is the last k real inputs, not the last k positions. (A cache
    that records the past keeps every input of the forward, the window last.)"""
    cache.layers[layer_idx].conv_states[0][..., -window.shape[-1]:].copy_(window)


def update_recurrent_state(cache, layer_idx: int, state: torch.Tensor | list[torch.Tensor]) -> None:
    """Store the state (B, N, K, V) after this forward, in place, and mark the layer as continuing: without a conv,
    nothing else would mark it. Where the cache records the past, `state` is the list of the states after each of the
    forward's last steps (states_to_record), the final state last."""
    cache.update_recurrent_state(state, layer_idx)
    cache.layers[layer_idx].has_previous_state[0] = True


def cached_tokens(cache) -> int | None:
    """The number of tokens a cache has seen (0 for no cache), None where reading it would break a compiled graph or
    the cache does not count them."""
    if cache is None:
        return 0
    seen = getattr(cache, "seen_tokens", None)
    if seen is None or torch.compiler.is_compiling():
        return None
    return int(seen)


def cache_batch_size(cache) -> int | None:
    """The batch size a cache holds state for, or None while it holds none."""
    for layer_idx, layer in enumerate(getattr(cache, "layers", ())):
        if isinstance(layer, LinearAttentionLayer):
            state = recurrent_state(cache, layer_idx)
            if state is not None:
                return state.shape[0]
        elif getattr(layer, "is_initialized", False):
            return layer.keys.shape[0]
    return None
