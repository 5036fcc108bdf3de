"""The short convolution op: silu(depthwise causal conv1d) in front of the recurrence, for whole sequences
(`causal_conv1d_silu`) and for one decode step over a cached window (`causal_conv1d_step`). Each validates its inputs
and chooses between the PyTorch reference (naive.py) and the Triton kernels (triton_whole_sequence.py,
triton_decode_step.py)."""

import torch
import torch.nn.functional as F

from ..backend import needs_grad, uses_triton
from ..validation import validate_conv_step_inputs, validate_short_conv_inputs
from .naive import causal_conv1d, causal_conv1d_step_reference

__all__ = ["causal_conv1d", "causal_conv1d_silu", "causal_conv1d_step", "causal_conv1d_step_reference"]


def causal_conv1d_silu(
    x: torch.Tensor,
    weight: torch.Tensor,
    split_sizes: list[int] | None = None,
    *,
    context: torch.Tensor | None = None,
    padding_mask: torch.Tensor | None = None,
    sequence_ids: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
    """silu(depthwise causal conv1d of x (B, S, C) with weight (C, k)), as the blocks `split_sizes` (at most three
    widths summing to C; None for one block), each a contiguous tensor of its own in the dtype of x.

    context, padding_mask, sequence_ids: as for `causal_conv1d` (the cached inputs before x followed by x; 0 at
    padding, which a tap skips; packed sequences, which a tap never crosses). Returns the blocks and, where a
    `context` was given, the window to cache: the last k real inputs (B, C, k); otherwise None.

    The Triton kernels take whole rows without context or padding (training, a prefill without cache), on the
    Triton backend, with gradients for x and weight; everything else runs the PyTorch reference.
    """
    sizes = validate_short_conv_inputs(x, weight, sequence_ids, split_sizes)
    if context is None and padding_mask is None and uses_triton(backend, x):
        from .triton_whole_sequence import short_conv_op

        return tuple(short_conv_op(x, weight, sequence_ids, sizes)), None
    out, window = causal_conv1d(x, weight, context, padding_mask, sequence_ids)
    return F.silu(out).split(sizes, dim=-1), window if context is not None else None


def causal_conv1d_step(
    x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor, backend: str = "auto"
) -> torch.Tensor:
    """One decode step: silu(Σ_j weight[:, j] · window[:, j]) with window = (conv_state[..., 1:], x), and the cached
    window conv_state (B, C, k) becomes that window, in place. x (B, C), weight (C, k); returns (B, C).

    The Triton kernel (one launch instead of a copy, a product, a sum and the SiLU) runs on the Triton backend where
    no gradient is needed: it has no backward."""
    validate_conv_step_inputs(x, conv_state, weight)
    if uses_triton(backend, x) and not needs_grad(x, conv_state, weight):
        from .triton_decode_step import causal_conv1d_step_triton

        return causal_conv1d_step_triton(x, conv_state, weight)
    return causal_conv1d_step_reference(x, conv_state, weight)
