"""A prompt's state in a file: run a long prompt once, save the cache, and continue generation from it later."""

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.cache_utils import LinearAttentionLayer

from .cache import M2RNNCache, conv_state, recurrent_state, update_conv_state, update_recurrent_state
from .prompt_state_checks import check_prompt_state


def save_prompt_state(cache: M2RNNCache, path) -> None:
    """Write every layer's state after a prompt to a safetensors file: conv window and recurrent state of the
    M2RNN layers, keys and values of the attention layers, and the number of tokens seen."""
    tensors = {}
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
    it would have from the original cache (pass the prompt plus the new tokens as `input_ids`).

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
    check_prompt_state(path, tensors, int(metadata["seen_tokens"]), config, dtype)
    cache = M2RNNCache(config)
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
