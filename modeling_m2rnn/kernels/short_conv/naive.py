"""The depthwise causal convolution in front of the recurrence, aware of padding and of packed sequences."""

import torch
import torch.nn.functional as F


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
    a depthwise conv kernel needs channel-major copies both ways.
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


def causal_conv1d_step_reference(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """One decode step of `causal_conv1d` and its SiLU: x (B, C) the new input, conv_state (B, C, k) the last k inputs,
    updated in place to (conv_state[..., 1:], x), weight (C, k). Returns (B, C)."""
    window = torch.cat([conv_state[..., 1:], x[..., None].to(conv_state.dtype)], dim=-1)   # (B, C, k)
    conv_state.copy_(window)
    out, _ = causal_conv1d(x[:, None], weight, context=window)
    return F.silu(out[:, 0])
