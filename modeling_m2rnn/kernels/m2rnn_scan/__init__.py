"""The M2RNN recurrence op (docs/design.md, "Kernel contracts"): `m2rnn_scan` validates its inputs and chooses
between the PyTorch reference (naive.py) and the Triton kernels (triton_scan.py and the kernels it launches)."""

import torch

from ..backend import uses_triton
from ..validation import validate_scan_inputs
from .naive import m2rnn_scan_reference

__all__ = ["m2rnn_scan", "m2rnn_scan_reference"]


def m2rnn_scan(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    W: torch.Tensor,
    f: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    gradient_clipping: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the M2RNN recurrence over time for every head.

    Shapes: q (B, S, Nq, K), k (B, S, Nk, K), v (B, S, Nv, V), W (Nw, V, V), f (B, S, Nf) float32 in (0, 1].
    Every head count divides N = max(Nq, Nk, Nv, Nf, Nw); head n reads group n // (N / Nx) of an input
    with Nx heads. With `cu_seqlens` (int, [0, ..., S]) B must be 1 and each packed sequence starts
    from its own initial state.

    Returns y (B, S, N, V) in the dtype of `v` and the final state (B, N, K, V) in float32
    (float64 for float64 inputs); with `cu_seqlens` the state has one row per sequence.

    `gradient_clipping=c` clamps, in the backward pass, the whole gradient reaching each state H_t to
    [-c, c]. `backend`: "torch" (the reference loop), "triton" (CUDA, or the CPU under
    TRITON_INTERPRET=1) or "auto" (Triton on CUDA when available, else the reference); float64 inputs
    always run the reference.
    """
    validate_scan_inputs(q, k, v, W, f, initial_state, gradient_clipping, cu_seqlens)
    if not uses_triton(backend, v):
        return m2rnn_scan_reference(q, k, v, W, f, initial_state, gradient_clipping, cu_seqlens)
    from .triton_scan import m2rnn_scan_triton

    return m2rnn_scan_triton(q, k, v, W, f, initial_state, gradient_clipping, cu_seqlens)
