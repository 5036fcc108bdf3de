"""The gated delta rule op (Gated DeltaNet's recurrence; docs/design.md, "Gated DeltaNet"): one contract, an exact
PyTorch reference (`naive.py`) and fla-core's kernels on CUDA (`fla.py`). No kernels of this package's own; this file
alone decides which implementation runs."""

import warnings

import torch

from ..backend import needs_grad
from ..validation import validate_gated_delta_rule_inputs
from .fla import FUSED_RECURRENT_MAX_TOKENS, fla_backward_refusal, fla_is_available, gated_delta_rule_fla
from .naive import gated_delta_rule_reference

__all__ = ["GDN_BACKENDS", "fla_is_available", "gated_delta_rule", "gated_delta_rule_reference", "uses_fla"]

GDN_BACKENDS = ("auto", "torch", "fla")


def _fail(message: str):
    raise ValueError(f"gated_delta_rule: {message}")


def uses_fla(backend: str, x: torch.Tensor) -> bool:
    """Whether `backend` runs on fla's kernels for tensors like `x`: "fla" always (CUDA, not float64), "auto" for
    CUDA tensors when fla-core is installed and x is not float64 (float64 keeps the reference: fla computes in
    float32), "torch" never."""
    if backend not in GDN_BACKENDS:
        _fail(f"`backend` must be one of {GDN_BACKENDS}, got {backend!r}")
    if backend == "auto":
        return x.is_cuda and x.dtype != torch.float64 and fla_is_available() and not compiled_decode_step(x)
    if backend == "fla":
        if not fla_is_available():
            _fail("backend='fla' needs fla-core (`pip install m2rnn[fla]`)")
        if not x.is_cuda or x.dtype == torch.float64:
            _fail(f"backend='fla' runs on CUDA tensors of 16 or 32 bits, got {x.dtype} on {x.device}")
    return backend == "fla"


def compiled_decode_step(x: torch.Tensor) -> bool:
    """A few tokens without gradients inside a graph being compiled (a compiled decode step): "auto" gives them the
    reference, a handful of small products that the compiler fuses into the step's graph, because fla's Python
    wrapper of its kernels cannot be traced into one graph."""
    return torch.compiler.is_compiling() and not torch.is_grad_enabled() and x.shape[1] <= FUSED_RECURRENT_MAX_TOKENS


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    qk_l2norm: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the gated delta rule over time for every head (the recurrence of naive.py's docstring).

    Shapes: q, k (B, S, H, K), v (B, S, H, V), g (B, S, H) float32 log decay (<= 0), beta (B, S, H) in [0, 1]
    (or [0, 2) for negative eigenvalues); `scale` defaults to K^-1/2; `initial_state` (N, H, K, V) float32.
    With `cu_seqlens` (int, [0, ..., S]) B must be 1 and each packed sequence starts from its own initial state.
    `qk_l2norm` l2-normalises q and k first (eps 1e-6), as fla's `use_qk_l2norm_in_kernel`.

    Returns o (B, S, H, V) in the dtype of `v` and the final state (N, H, K, V) in float32 (float64 for float64
    inputs), N = B or the number of packed sequences. `backend`: "torch" (the reference loop), "fla" (fla-core's
    kernels, CUDA) or "auto" (fla for CUDA tensors when installed and not float64, else the reference; the reference
    too in a compiled decode step, and where gradients are needed and fla's backward refuses the GPU and Triton, with
    a warning saying why).
    """
    validate_gated_delta_rule_inputs(q, k, v, g, beta, scale, initial_state, cu_seqlens)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    implementation = gated_delta_rule_fla if uses_fla(backend, q) else gated_delta_rule_reference
    if implementation is gated_delta_rule_fla and backend == "auto" and needs_grad(q, k, v, g, beta, initial_state):
        refusal = fla_backward_refusal(q.device)
        if refusal is not None:
            warnings.warn(f"gated_delta_rule: {refusal}; running the PyTorch reference loop instead", stacklevel=2)
            implementation = gated_delta_rule_reference
    return implementation(q, k, v, g, beta, scale, initial_state, cu_seqlens, qk_l2norm)
