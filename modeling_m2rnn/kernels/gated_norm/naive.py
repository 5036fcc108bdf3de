"""The output gate and norm of the M2RNN layer in plain PyTorch: the reference the Triton kernels are tested against,
and the code every case the kernels do not take runs (grouped v or g, float64, the torch backend)."""

from collections.abc import Callable

import torch
import torch.nn.functional as F

# Averages a per-token value (..., 1) over equal parts of the normalised dimension held elsewhere (by the other
# ranks of a tensor-parallel group), so that the norm is over the whole dimension.
MeanOverParts = Callable[[torch.Tensor], torch.Tensor]


def rms_norm(
    hidden_states: torch.Tensor, weight: torch.Tensor, eps: float, mean_over_parts: MeanOverParts | None = None
) -> torch.Tensor:
    """weight ⊙ x / sqrt(mean(x²) + eps) over the last dimension, normalised in float32 and cast back before the
    weight, as Llama's norm does. With `mean_over_parts`, x and weight are one of equal parts of the dimension."""
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.float()
    mean_square = hidden_states.pow(2).mean(-1, keepdim=True)
    if mean_over_parts is not None:
        mean_square = mean_over_parts(mean_square)
    hidden_states = hidden_states * torch.rsqrt(mean_square + eps)
    return weight * hidden_states.to(input_dtype)


def per_group(x: torch.Tensor, groups: int, shared: bool = False) -> torch.Tensor:
    """View the head axis (third from last) of x (..., heads, D) as (..., groups, heads // groups, D); with
    `shared`, x has one head per group, broadcast over the group's heads as `repeat_interleave` would copy it."""
    *lead, heads, dim = x.shape
    return x.unsqueeze(-2) if shared else x.view(*lead, groups, heads // groups, dim)


def gated_rms_norm_reference(
    y, g, weight, eps: float, v=None, D=None, mean_over_parts: MeanOverParts | None = None
) -> torch.Tensor:
    """rms_norm((y + D ⊙ v) ⊙ silu(g), weight, eps) over all heads: y (B, S, N, V), v (B, S, Nv, V), D (N, V),
    g (B, S, Ng, V), each v and g head shared by its group of heads; v and D are None without the residual.
    Returns (B, S, N·V). With `mean_over_parts`, the N heads are one of equal parts of all heads (see rms_norm)."""
    if D is not None:
        residual = per_group(D, v.shape[2]) * per_group(v, v.shape[2], shared=True)
        y = (per_group(y, v.shape[2]) + residual).flatten(2, 3)                  # (B, S, N, V)
    y = per_group(y, g.shape[2]) * per_group(F.silu(g), g.shape[2], shared=True)
    return rms_norm(y.flatten(2), weight, eps, mean_over_parts)                    # (B, S, N·V)
