"""The gated norm op behind the recurrence: weight ⊙ RMSNorm((y + D ⊙ v) ⊙ silu(g)) over the N·V values of each
token. `gated_rms_norm` validates its inputs and chooses between the PyTorch reference (naive.py) and the Triton
kernels (triton.py)."""

import functools

import torch

from ..backend import uses_triton
from ..validation import validate_gated_norm_inputs
from .naive import MeanOverParts, gated_rms_norm_reference, rms_norm

__all__ = ["gated_rms_norm", "gated_rms_norm_reference", "rms_norm"]


def gated_rms_norm(
    y: torch.Tensor,
    g: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    v: torch.Tensor | None = None,
    D: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    backend: str = "auto",
    mean_over_parts: MeanOverParts | None = None,
) -> torch.Tensor:
    """weight ⊙ RMSNorm((y + D ⊙ v) ⊙ silu(g)) over all heads: y (B, S, N, V), g (B, S, Ng, V), v (B, S, Nv, V),
    D (N, V), v and D both None without the residual, weight (N·V,); a v or g head is shared by its group of heads.
    Returns (B, S, N·V).

    The Triton kernels (one launch each way) take one v and g per head on the Triton backend, with gradients for
    every tensor; they compute in float32 and write `out_dtype`, by default the autocast dtype under autocast (what
    the output projection would cast to) and the promoted dtype of the inputs otherwise. Everything else runs the
    PyTorch reference, in the dtype it computes in unless `out_dtype` is given.

    `mean_over_parts` (heads split across tensor-parallel ranks: the N heads here are one of equal parts, and the
    norm is over all of them) runs the PyTorch reference, which takes it; the kernels normalise one part only."""
    validate_gated_norm_inputs(y, g, weight, v, D)
    per_head = g.shape[2] == y.shape[2] and (v is None or v.shape[2] == y.shape[2])
    if mean_over_parts is not None or not (per_head and uses_triton(backend, y)):
        out = gated_rms_norm_reference(y, g, weight, eps, v, D, mean_over_parts)
        return out if out_dtype is None else out.to(out_dtype)
    from .triton import gated_rms_norm_triton

    if out_dtype is None:
        device = y.device.type
        autocast = torch.is_autocast_enabled(device)
        tensors = [x for x in (y, g, weight, v, D) if x is not None]
        out_dtype = (torch.get_autocast_dtype(device) if autocast
                     else functools.reduce(torch.promote_types, [x.dtype for x in tensors]))
    return gated_rms_norm_triton(y, g, weight, eps, v, D, out_dtype)
