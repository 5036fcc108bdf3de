"""The generate hooks of M2RNNForCausalLM: its own caches, cheap masks for a static decode step, and decode steps
replayed as CUDA graphs."""

import torch
import torch.nn.functional as F
from transformers.masking_utils import create_masks_for_generate

from ..configuration.configuration_m2rnn import ATTENTION_LAYER, M2RNN_LAYER
from .cache import CACHE_ARGUMENT_NAMES, M2RNNStaticCache, as_m2rnn_cache, cached_tokens
from .decode_graphs import DecodeGraphs, graph_free_compile_kwargs


class M2RNNGenerationMixin:
    """Overrides of transformers' generate hooks; it goes before the PreTrainedModel in the bases of a model class
    (PreTrainedModel defines `get_compiled_call` too), which keeps GenerationMixin among its bases as well."""

    def prepare_inputs_for_generation(self, input_ids, *args, inputs_embeds=None, **kwargs):
        """On the first step of a generate that continues a cache, the input must be the cached tokens followed by new
        ones (or only the new ones with an attention mask over both): generate trims the cached tokens off it. Where
        the cache came from a prompt-state file that kept the prompt's ids, the cached tokens must be those.
        (`inputs_embeds` is named in the signature: generate starts from embeddings only for models whose hook
        names it.)"""
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        if kwargs.get("is_first_iteration") and cache is not None and inputs_embeds is None:
            cached = cached_tokens(cache)
            new = new_tokens_of_first_input(input_ids, cached or 0, kwargs)
            if cached and new <= 0:
                raise ValueError(
                    f"the cache holds {cached} tokens, and `input_ids` must start with those {cached} tokens and add "
                    f"at least one: got {input_ids.shape[1]} tokens. Pass the prompt followed by the new tokens"
                )
            if new < input_ids.shape[1]:   # the input holds the cached tokens too
                check_starts_with_prompt(input_ids, getattr(cache, "prompt_ids", None))
        return super().prepare_inputs_for_generation(input_ids, *args, inputs_embeds=inputs_embeds, **kwargs)

    def create_masks_for_generate(self, config, inputs_embeds, attention_mask, past_key_values=None, **kwargs):
        """The masks generate hands a compiled forward, built on the host before every decode step while the GPU
        waits. For a decode step over the static cache they are simple (no recurrent mask; the attention layers see
        the real tokens so far), and built directly they cost a fraction of the general function's host time."""
        cache = past_key_values if past_key_values is not None else kwargs.pop("cache", None)
        masks = _static_decode_masks(config, inputs_embeds, attention_mask, cache)
        if masks is None:
            masks = create_masks_for_generate(config, inputs_embeds, attention_mask, cache, **kwargs)
        return masks

    def get_compiled_call(self, compile_config):
        """The forward generate's decode loop calls when it compiles. Where the config asks for CUDA graphs (the
        default, "reduce-overhead") on a CUDA device, the decode steps run as graphs captured by `DecodeGraphs`
        instead of inductor's, which cost generate several times less host time per token."""
        if self.device.type != "cuda":
            return super().get_compiled_call(compile_config)
        compile_kwargs = graph_free_compile_kwargs(compile_config or self._default_compile_config())
        if compile_kwargs is None:
            return super().get_compiled_call(compile_config)
        graphs = getattr(self, "_decode_graphs", None)
        if graphs is None or graphs.compile_kwargs != compile_kwargs:
            graphs = self._decode_graphs = DecodeGraphs(self, compile_kwargs)
        graphs.check_model()
        return graphs

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """generate() builds a plain DynamicCache or StaticCache, or takes the caller's; both become ours in place
        (as_m2rnn_cache): ours also count tokens, which a model made only of M2RNN layers needs (it has no attention
        layer to measure the cache length by)."""
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        config = self.config.get_text_config(decoder=True)
        for name in CACHE_ARGUMENT_NAMES:
            if name in model_kwargs:
                as_m2rnn_cache(model_kwargs[name], config)


def _static_decode_masks(config, inputs_embeds, attention_mask, cache) -> dict | None:
    """The masks of one decode step over an M2RNNStaticCache, or None for any other case.

    A generated token is never padding, so the M2RNN layers need no mask. Under sdpa, each attention layer's mask
    is (B, 1, 1, max_cache_len), True at the key slots that hold a real token, this step's included: with generate's
    2D padding mask, the mask's ones (it covers every token so far, one per filled slot); without one, the slots up
    to this token's. These are the masks transformers' `create_causal_mask` builds for such a step.
    """
    if not (isinstance(cache, M2RNNStaticCache) and inputs_embeds.shape[1] == 1):
        return None
    if attention_mask is not None and not (isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2):
        return None
    masks = {M2RNN_LAYER: None}
    if ATTENTION_LAYER not in config.layer_types:
        return masks
    layer_idx = config.layer_types.index(ATTENTION_LAYER)
    cache_len = cache.layers[layer_idx].max_cache_len
    if config._attn_implementation != "sdpa" or (attention_mask is not None and attention_mask.shape[1] > cache_len):
        return None
    if attention_mask is None:
        slots = torch.arange(cache_len, device=inputs_embeds.device)
        visible = slots <= cache.get_seq_length(layer_idx)   # the tokens cached so far, and this one
        masks[ATTENTION_LAYER] = visible.expand(inputs_embeds.shape[0], 1, 1, cache_len)
    else:
        padding_mask = F.pad(attention_mask.bool(), (0, cache_len - attention_mask.shape[1]))
        masks[ATTENTION_LAYER] = padding_mask[:, None, None, :]
    return masks


def new_tokens_of_first_input(input_ids: torch.Tensor, cached: int, kwargs: dict) -> int:
    """How many of the first input's tokens the cache has not seen. Newer transformers say it in
    `next_sequence_length` (None: the whole input, under an attention mask that covers the cached tokens too; it drops
    an all-ones mask before this hook); before that, the attention mask's length tells."""
    if "next_sequence_length" in kwargs:
        new = kwargs["next_sequence_length"]
        return input_ids.shape[1] if new is None else new
    mask = kwargs.get("attention_mask")
    covered = mask.shape[-1] if isinstance(mask, torch.Tensor) and mask.dim() == 2 else input_ids.shape[1]
    return covered - cached


def check_starts_with_prompt(input_ids: torch.Tensor, prompt_ids: torch.Tensor | None) -> None:
    """The first generate step on a loaded prompt state whose file kept the prompt's ids: the input must begin with
    them (each row repeated for beams or samples), or the state would continue another text without a word."""
    if prompt_ids is None or input_ids.shape[1] < prompt_ids.shape[1] or input_ids.shape[0] % prompt_ids.shape[0]:
        return   # (a short input or another batch size is refused with its own message)
    expected = prompt_ids.to(input_ids.device).repeat_interleave(input_ids.shape[0] // prompt_ids.shape[0], dim=0)
    differs = (input_ids[:, : expected.shape[1]] != expected).any(dim=0).nonzero()
    if len(differs):
        raise ValueError(
            f"`input_ids` must start with the {expected.shape[1]} prompt tokens the prompt state was saved after; "
            f"they differ first at position {int(differs[0])}"
        )
