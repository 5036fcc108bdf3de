"""Whether a prompt-state file fits the model that would continue from it: layer kinds, number of layers, state
shapes and dtypes. A mismatch raises a ValueError naming what differs, at load, instead of a KeyError, a silent
acceptance or a crash at the first generated token."""

import re

import torch

_TENSOR_NAME = re.compile(r"layers\.(\d+)\.(keys|values|recurrent_state|conv_state)")
_ATTENTION_TENSORS = {"keys", "values"}


def expected_shapes(config, layer_idx: int) -> dict[str, tuple[int, ...]]:
    """The shapes of a layer's tensors after the batch axis (attention: without the token axis either), by its mixer."""
    if config.mixer_types[layer_idx] == "gated_deltanet":
        heads, k_heads = config.gdn_num_heads, config.gdn_num_k_heads or config.gdn_num_heads
        key_dim, value_dim = config.gdn_key_head_dim, config.gdn_value_head_dim
        return {
            "recurrent_state": (heads, key_dim, value_dim),
            "conv_state": (2 * k_heads * key_dim + heads * value_dim, config.gdn_conv_kernel_size),
        }
    conv_channels = config.m2rnn_k_head_dim * (config.m2rnn_num_q_heads + config.m2rnn_num_k_heads)
    conv_channels += config.m2rnn_v_head_dim * config.m2rnn_num_v_heads
    return {
        "recurrent_state": (config.m2rnn_num_heads, config.m2rnn_k_head_dim, config.m2rnn_v_head_dim),
        "conv_state": (conv_channels, config.m2rnn_conv_kernel_size),
        "keys": (config.num_key_value_heads, config.head_dim),
        "values": (config.num_key_value_heads, config.head_dim),
    }


def check_prompt_state(path, tensors: dict[str, torch.Tensor], seen_tokens: int, config, dtype=None,
                       prompt_ids: torch.Tensor | None = None) -> None:
    """tensors: the file's states, by name; dtype: the model's activations dtype, None when unknown; prompt_ids: the
    prompt's token ids the file holds, if any."""
    by_layer: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        match = _TENSOR_NAME.fullmatch(name)
        if match is None:
            raise ValueError(f"{path}: unexpected tensor {name!r} in a prompt state")
        by_layer.setdefault(int(match.group(1)), {})[match.group(2)] = tensor

    num_layers = max(by_layer, default=-1) + 1
    if num_layers != config.num_hidden_layers or len(by_layer) != num_layers:
        raise ValueError(
            f"{path} holds the state of layers {sorted(by_layer)}, the config has {config.num_hidden_layers} layers: "
            "the prompt state belongs to another model"
        )
    batch_sizes = set()
    for i, layer_type in enumerate(config.layer_types):
        found, shapes = by_layer[i], expected_shapes(config, i)
        is_attention = layer_type == "full_attention"
        if is_attention != (set(found) == _ATTENTION_TENSORS):
            kind = "attention" if set(found) & _ATTENTION_TENSORS else "M2RNN"
            raise ValueError(
                f"{path}: layer {i} is an {kind} layer in the prompt state, but {layer_type} in the config"
            )
        has_conv = config.mixer_types[i] == "gated_deltanet" or config.m2rnn_conv_kernel_size is not None
        if not is_attention and ("conv_state" in found) != has_conv:
            raise ValueError(
                f"{path}: layer {i} has {'a' if 'conv_state' in found else 'no'} convolution window in the prompt "
                f"state, but the config has m2rnn_conv_kernel_size={config.m2rnn_conv_kernel_size}"
            )
        for name, tensor in found.items():
            batch_sizes.add(tensor.shape[0])
            shape = tuple(tensor.shape[1:])
            if name in _ATTENTION_TENSORS:   # (B, H_kv, T, D): the tokens are checked apart from the sizes
                if len(shape) != 3 or shape[1] != seen_tokens:
                    raise ValueError(f"{path}: layer {i} {name} has shape {tuple(tensor.shape)}, expected (batch, "
                                     f"heads, {seen_tokens} tokens, head_dim)")
                shape = (shape[0], shape[2])
            if shape != shapes[name]:
                raise ValueError(
                    f"{path}: layer {i} {name} has per-row shape {shape}, the config gives {shapes[name]}"
                    f"{' (heads, head_dim)' if name in _ATTENTION_TENSORS else ''}"
                )
            if dtype is None:
                continue
            # the recurrent state is float32 (float64 for a float64 model), the rest in the activations' dtype
            expected_dtype = dtype
            if name == "recurrent_state":
                expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
            if tensor.dtype != expected_dtype:
                raise ValueError(
                    f"{path}: layer {i} {name} is {tensor.dtype}, where the model expects {expected_dtype}: load the "
                    "model in the dtype the prompt state was saved from"
                )
    if prompt_ids is not None:
        batch_sizes.add(prompt_ids.shape[0])
        if prompt_ids.dim() != 2 or prompt_ids.shape[1] != seen_tokens:
            raise ValueError(f"{path}: its input_ids have shape {tuple(prompt_ids.shape)}, where the state has seen "
                             f"{seen_tokens} tokens")
    if len(batch_sizes) > 1:
        raise ValueError(f"{path}: the layers hold states of different batch sizes {sorted(batch_sizes)}")
