"""A prompt's state in a file: run a long prompt once, save the cache, and continue generation from it later."""

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.cache_utils import LinearAttentionLayer

from .cache import M2RNNCache, conv_state, recurrent_state, update_conv_state, update_recurrent_state
from .prompt_state_checks import check_prompt_state


def save_prompt_state(cache: M2RNNCache, path, input_ids: torch.Tensor | None = None) -> None:
    """Write every layer's state after a prompt to a safetensors file: conv window and recurrent state of the
    recurrent layers, keys and values of the attention layers, and the number of tokens seen. With the prompt's
    `input_ids` (batch, tokens seen), the file keeps them too, and `generate` on the loaded state checks that its
    input starts with them."""
    tensors = {}
    if input_ids is not None:
        if input_ids.dim() != 2 or input_ids.shape[1] != int(cache.seen_tokens):
            raise ValueError(f"`input_ids` must be the prompt the cache has seen, (batch, {int(cache.seen_tokens)}) "
                             f"token ids: got shape {tuple(input_ids.shape)}")
        tensors["input_ids"] = input_ids.long()
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, LinearAttentionLayer):
            state = recurrent_state(cache, i)
            if state is None:
                raise ValueError(
                    f"layer {i} holds no state yet: run the prompt through the model with this cache first"
                )
            tensors[f"layers.{i}.recurrent_state"] = state
            window = conv_state(cache, i)
            if window is not None:
                tensors[f"layers.{i}.conv_state"] = window
        else:
            tensors[f"layers.{i}.keys"], tensors[f"layers.{i}.values"] = layer.keys, layer.values
    metadata = {"seen_tokens": str(int(cache.seen_tokens)), "format": "m2rnn-prompt-state-1"}
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(path), metadata=metadata)


def load_prompt_state(path, config, device=None) -> M2RNNCache:
    """A fresh `M2RNNCache` holding the state `save_prompt_state` wrote; generation continues from it exactly as
    it would have from the original cache (pass the prompt plus the new tokens as `input_ids`; where the file holds
    the prompt's ids, an input that does not start with them raises a ValueError).

    `config`: the config of the model that continues, or the model itself (then its dtype is checked too and its
    device is the default). A state of another model raises a ValueError naming what differs."""
    dtype = getattr(config, "dtype", None)
    if isinstance(config, torch.nn.Module):
        device = device or config.device
        config = config.config
    with safe_open(str(path), framework="pt", device=str(device or "cpu")) as file:
        metadata = file.metadata() or {}
        if metadata.get("format") != "m2rnn-prompt-state-1":
            raise ValueError(f"{path} is not a prompt state written by save_prompt_state")
        tensors = {name: file.get_tensor(name) for name in file.keys()}
    prompt_ids = tensors.pop("input_ids", None)
    check_prompt_state(path, tensors, int(metadata["seen_tokens"]), config, dtype, prompt_ids)
    cache = M2RNNCache(config)
    cache.prompt_ids = prompt_ids
    for i, layer_type in enumerate(config.layer_types):
        if layer_type == "full_attention":
            cache.update(tensors[f"layers.{i}.keys"], tensors[f"layers.{i}.values"], i)
            continue
        if f"layers.{i}.conv_state" in tensors:
            window = tensors[f"layers.{i}.conv_state"]
            update_conv_state(cache, i, window, kernel_size=window.shape[-1])
        update_recurrent_state(cache, i, tensors[f"layers.{i}.recurrent_state"])
    cache.seen_tokens = int(metadata["seen_tokens"])
    return cache
