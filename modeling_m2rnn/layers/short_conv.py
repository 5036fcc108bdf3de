"""The depthwise causal convolution in front of the recurrence, aware of padding and of packed sequences."""

import torch
import torch.nn.functional as F

from ..kernels import causal_conv1d_silu, causal_conv1d_step


def _gather_time(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, T, C) reordered along time by index (B, T)."""
    return x.gather(1, index.unsqueeze(-1).expand_as(x))


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    context: torch.Tensor | None = None,
    padding_mask: torch.Tensor | None = None,
    sequence_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal convolution of `x` (B, S, C) with `weight` (C, k), one output per input.

    context:      (B, C, T) the inputs before `x` followed by `x`, as a transformers conv cache hands them back
                  (zero-filled on the left when shorter than k − 1 + S); None for a fresh start.
    padding_mask: (B, S), 0 at padding. A token sees the k − 1 previous *real* inputs, padding is skipped,
                  so padding anywhere (left, or inside a continuation) changes nothing for real tokens.
    sequence_ids: (B, S) packed sequences of a row; a tap never reads across a sequence boundary.

    Returns the output (B, S, C) and the last k real inputs (B, C, k), the window to cache for the next call.

    The convolution is k shifted products summed in the (B, S, C) layout of the projection, not a conv kernel:
    torch.compile fuses them with their neighbours (the SiLU, the split into q, k, v) forward and backward, where
    a depthwise conv kernel needs channel-major copies both ways (H200, 400M hybrid training step: 26 ms of conv
    and copies, benchmarks/RESULTS.md).
    """
    batch, seq_len, _ = x.shape
    kernel_size = weight.shape[1]
    width = kernel_size - 1 + seq_len
    window = x if context is None else context.transpose(1, 2)
    window = F.pad(window, (0, 0, max(0, width - window.shape[1]), 0))[:, -width:]   # (B, k − 1 + S, C)

    order = None
    if padding_mask is not None:
        # A stable sort moves the padding to the front: real inputs end up adjacent to their predecessors.
        is_real = F.pad(padding_mask.bool(), (kernel_size - 1, 0), value=True)
        order = torch.sort(is_real.to(torch.int8), dim=-1, stable=True).indices         # (B, k − 1 + S)
        window = _gather_time(window, order)
    same_sequence = None
    if sequence_ids is not None:
        # the cached inputs before the chunk belong to the row's first sequence
        window_ids = torch.cat([sequence_ids[:, :1].expand(batch, kernel_size - 1), sequence_ids], dim=1)
        if order is not None:
            window_ids = window_ids.gather(-1, order)
        same_sequence = [window_ids[:, tap : tap + seq_len] == window_ids[:, -seq_len:] for tap in range(kernel_size)]

    # in the activations' dtype, as nn.Conv1d under autocast: a float32 weight must not promote bf16 inputs
    weight = weight.to(window.dtype)
    out = None
    for tap in range(kernel_size):
        term = weight[:, tap] * window[:, tap : tap + seq_len]                           # (B, S, C)
        if same_sequence is not None:   # a tap is dropped where it would reach into another sequence
            term = term * same_sequence[tap].unsqueeze(-1)
        out = term if out is None else out + term

    if order is not None:
        # back to the original token order: output j of the sorted window belongs to position order[j]
        full = torch.zeros_like(window).scatter(1, order[:, -seq_len:].unsqueeze(-1).expand_as(out), out)
        out = full[:, -seq_len:]
    return out, window[:, -kernel_size:].transpose(1, 2)


def short_conv_silu(
    qkv: torch.Tensor,
    weight: torch.Tensor,
    split_sizes: list[int],
    layer_idx: int,
    padding_mask: torch.Tensor | None = None,
    sequence_ids: torch.Tensor | None = None,
    cache=None,
    use_triton: bool = False,
) -> tuple[torch.Tensor, ...]:
    """The blocks `split_sizes` of silu(causal_conv1d(qkv)) for a recurrent layer's q, k, v: qkv (B, S, C), weight
    (C, k). With a cache, reads and updates layer `layer_idx`'s conv window (the last k real inputs). With
    `use_triton`, a decode step without gradients and whole rows without padding or cache (training) run on the Triton
    kernels; float64 keeps the PyTorch conv (the kernels compute in float32)."""
    kernel_size = weight.shape[1]
    use_triton = use_triton and qkv.dtype != torch.float64
    if use_triton and _is_conv_decode_step(qkv, weight, layer_idx, padding_mask, cache):
        out = causal_conv1d_step(qkv[:, 0], cache.layers[layer_idx].conv_states[0], weight).unsqueeze(1)
        return out.split(split_sizes, dim=-1)
    if use_triton and cache is None and padding_mask is None:
        return causal_conv1d_silu(qkv, weight, sequence_ids, split_sizes)
    context = None
    if cache is not None:
        context = cache.update_conv_state(qkv.transpose(1, 2), layer_idx, conv_kernel_size=kernel_size)
    out, last_inputs = causal_conv1d(qkv, weight, context, padding_mask, sequence_ids)
    if cache is not None and padding_mask is not None:
        # the cache kept the last k positions; with padding among them, the window is the last k real inputs
        cache.layers[layer_idx].conv_states[0].copy_(last_inputs)
    return F.silu(out).split(split_sizes, dim=-1)


def _is_conv_decode_step(qkv, weight, layer_idx: int, padding_mask, cache) -> bool:
    """One new token after a cached window, without gradients (the step kernel has no backward)."""
    if cache is None or qkv.shape[1] != 1 or padding_mask is not None:
        return False
    if torch.is_grad_enabled() and (qkv.requires_grad or weight.requires_grad):
        return False
    layer = cache.layers[layer_idx]
    return layer.has_previous_state[0] and layer.conv_states[0].shape[-1] == weight.shape[1]
