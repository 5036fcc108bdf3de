"""The short convolution in front of a recurrent layer's recurrence (M2RNN and Gated DeltaNet alike): silu(depthwise
causal conv) of the fused q·k·v projection, reading and updating the layer's cached window."""

import torch

from ..generation.cache import conv_state, has_previous_state, set_conv_state, states_to_record, update_conv_state
from ..kernels import causal_conv1d_silu, causal_conv1d_step
from .packing import PackedSequences


def short_conv_silu(
    qkv: torch.Tensor,
    weight: torch.Tensor,
    split_sizes: list[int],
    layer_idx: int,
    padding_mask: torch.Tensor | None,
    packed: PackedSequences | None,
    cache,
    backend: str,
) -> tuple[torch.Tensor, ...]:
    """The blocks `split_sizes` of silu(causal conv1d(qkv (B, S, C), weight (C, k))). One new token after a cached
    window is a decode step (the window updated in place); otherwise the whole chunk runs, after the cached window
    when there is one, and the cache keeps the last k real inputs (every input, where it records the past to roll it
    back: see generation.cache.states_to_record)."""
    kernel_size = weight.shape[1]
    window = conv_state(cache, layer_idx)                                          # (B, C, k) or None
    decode_step = (qkv.shape[1] == 1 and padding_mask is None and has_previous_state(cache, layer_idx)
                   and not states_to_record(cache, layer_idx))
    if decode_step and window is not None and window.shape[-1] == kernel_size:
        out = causal_conv1d_step(qkv[:, 0], window, weight, backend)
        return out.unsqueeze(1).split(split_sizes, dim=-1)
    context = None
    if cache is not None:
        context = update_conv_state(cache, layer_idx, qkv.transpose(1, 2), kernel_size)
    blocks, last_inputs = causal_conv1d_silu(
        qkv,
        weight,
        split_sizes,
        context=context,
        padding_mask=padding_mask,
        sequence_ids=packed.sequence_ids if packed is not None else None,
        backend=backend,
    )
    if cache is not None and padding_mask is not None:
        # the cache kept the last k positions; with padding among them, the window is the last k real inputs
        set_conv_state(cache, layer_idx, last_inputs)
    return blocks
