"""The gated delta rule op (Gated DeltaNet's recurrence, DESIGN.md §4a): one contract, an exact PyTorch reference
(`naive.py`) and fla-core's kernels on CUDA (`fla.py`). No kernels of this package's own; this file alone decides
which implementation runs."""

import warnings

import torch

from .fla import fla_backward_refusal, fla_is_available, gated_delta_rule_fla, needs_grad
from .naive import gated_delta_rule_reference

__all__ = ["GDN_BACKENDS", "fla_is_available", "gated_delta_rule", "gated_delta_rule_reference", "uses_fla"]

GDN_BACKENDS = ("auto", "torch", "fla")
_INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def _fail(message: str):
    raise ValueError(f"gated_delta_rule: {message}")


def uses_fla(backend: str, x: torch.Tensor) -> bool:
    """Whether `backend` runs on fla's kernels for tensors like `x`: "fla" always (CUDA, not float64), "auto" for
    CUDA tensors when fla-core is installed and x is not float64 (float64 keeps the reference: fla computes in
    float32), "torch" never."""
    if backend not in GDN_BACKENDS:
        _fail(f"`backend` must be one of {GDN_BACKENDS}, got {backend!r}")
    if backend == "auto":
        return x.is_cuda and x.dtype != torch.float64 and fla_is_available()
    if backend == "fla":
        if not fla_is_available():
            _fail("backend='fla' needs fla-core (`pip install m2rnn[fla]`)")
        if not x.is_cuda or x.dtype == torch.float64:
            _fail(f"backend='fla' runs on CUDA tensors of 16 or 32 bits, got {x.dtype} on {x.device}")
    return backend == "fla"


def _check_dims(name: str, x, ndim: int, layout: str):
    if not isinstance(x, torch.Tensor):
        _fail(f"expected `{name}` to be a torch.Tensor of shape {layout}, got {type(x).__name__}")
    if x.dim() != ndim:
        _fail(f"expected `{name}` of shape {layout}, got a {x.dim()}-D tensor of shape {tuple(x.shape)}")


def validate_gated_delta_rule_inputs(q, k, v, g, beta, scale, initial_state, cu_seqlens):
    """Raise a ValueError naming the rule any input breaks."""
    _check_dims("q", q, 4, "(B, S, H, K)")
    _check_dims("k", k, 4, "(B, S, H, K)")
    _check_dims("v", v, 4, "(B, S, H, V)")
    _check_dims("g", g, 3, "(B, S, H)")
    _check_dims("beta", beta, 3, "(B, S, H)")
    batch, seq_len, num_heads, key_dim = q.shape
    if tuple(k.shape) != tuple(q.shape):
        _fail(f"`k` must have the shape of `q` (B, S, H, K) = {tuple(q.shape)}, got {tuple(k.shape)}")
    if tuple(v.shape[:3]) != (batch, seq_len, num_heads):
        _fail(f"`v` must be (B, S, H, V) with (B, S, H) = {(batch, seq_len, num_heads)} from `q`, got {tuple(v.shape)}")
    for name, x in (("g", g), ("beta", beta)):
        if tuple(x.shape) != (batch, seq_len, num_heads):
            _fail(f"`{name}` must be (B, S, H) = {(batch, seq_len, num_heads)}, got {tuple(x.shape)}")
    if key_dim < 1 or v.shape[-1] < 1:
        _fail(f"head dims must be positive, got K={key_dim}, V={v.shape[-1]}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype not in _INPUT_DTYPES:
            _fail(f"`{name}` must be bfloat16, float16, float32 or float64, got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        _fail(f"`q`, `k`, `v` must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if g.dtype not in (torch.float32, torch.float64):
        _fail(f"`g` must be float32 (in bf16 a log decay near 0 rounds to 0 and freezes its head), got {g.dtype}")
    if not beta.is_floating_point():
        _fail(f"`beta` must be a floating-point tensor, got {beta.dtype}")
    if scale is not None and not scale > 0:
        _fail(f"`scale` must be a positive number or None (K^-1/2), got {scale}")
    tensors = [q, k, v, g, beta] + [x for x in (initial_state, cu_seqlens) if x is not None]
    devices = {x.device for x in tensors}
    if len(devices) > 1:
        _fail(f"all inputs must be on one device, got {sorted(str(d) for d in devices)}")

    num_states = batch
    if cu_seqlens is not None:
        _check_dims("cu_seqlens", cu_seqlens, 1, "(num_sequences + 1,)")
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            _fail(f"`cu_seqlens` must be int32 or int64, got {cu_seqlens.dtype}")
        if batch != 1:
            _fail(f"with `cu_seqlens` the sequences are packed along S, so B must be 1, got B={batch}")
        if len(cu_seqlens) < 2:
            _fail("`cu_seqlens` needs at least two entries, [0, ..., S]")
        if not torch.compiler.is_compiling():
            bounds = cu_seqlens.tolist()
            if bounds[0] != 0 or bounds[-1] != seq_len or any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
                _fail(f"`cu_seqlens` must rise from 0 to S={seq_len} without decreasing, got {bounds}")
        num_states = len(cu_seqlens) - 1
    if initial_state is not None:
        _check_dims("initial_state", initial_state, 4, "(N, H, K, V)")
        expected = (num_states, num_heads, key_dim, v.shape[-1])
        if tuple(initial_state.shape) != expected:
            _fail(f"`initial_state` must have shape {expected} (states, H, K, V), got {tuple(initial_state.shape)}")
        if initial_state.dtype not in (torch.float32, torch.float64):
            _fail(f"`initial_state` must be float32 (float64 with float64 inputs), got {initial_state.dtype}")


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
    too where gradients are needed and fla's backward refuses the GPU and Triton, with a warning saying why).
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
