"""The M2RNN recurrence op (DESIGN.md §6): one contract, a PyTorch reference and Triton kernels; and the short
convolution in front of it with its SiLU, for whole sequences (`causal_conv1d_silu`) and for one decode step
(`causal_conv1d_step`), and the output gate and norm behind it (`gated_rms_norm`), Triton only: their reference is
the layers' PyTorch code (`causal_conv1d` in layers/short_conv.py, `gated_rms_norm_torch` in layers/m2rnn.py).

This package knows nothing of transformers: it takes tensors and returns tensors.
"""

import functools

import torch

from .reference import m2rnn_scan_reference

__all__ = [
    "BACKENDS", "causal_conv1d_silu", "causal_conv1d_step", "gated_rms_norm", "m2rnn_scan", "m2rnn_scan_reference", "triton_is_available",
    "uses_triton",
]

BACKENDS = ("auto", "torch", "triton")
_INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def triton_is_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def uses_triton(backend: str, x: torch.Tensor) -> bool:
    """Whether `backend` runs on the Triton kernels for tensors like `x`: "triton" always, "auto" on CUDA."""
    if backend not in BACKENDS:
        _fail(f"`backend` must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return x.is_cuda and triton_is_available()
    if backend == "triton" and not triton_is_available():
        _fail("backend='triton' needs the `triton` package")
    return backend == "triton"


def _fail(message: str):
    raise ValueError(f"m2rnn_scan: {message}")


def _check_dims(name: str, x: torch.Tensor, ndim: int, layout: str):
    if not isinstance(x, torch.Tensor):
        _fail(f"expected `{name}` to be a torch.Tensor of shape {layout}, got {type(x).__name__}")
    if x.dim() != ndim:
        _fail(f"expected `{name}` of shape {layout}, got a {x.dim()}-D tensor of shape {tuple(x.shape)}")


def validate_scan_inputs(q, k, v, W, f, initial_state, gradient_clipping, cu_seqlens) -> int:
    """Raise a ValueError naming the rule any input breaks; return the number of heads N."""
    _check_dims("q", q, 4, "(B, S, Nq, K)")
    _check_dims("k", k, 4, "(B, S, Nk, K)")
    _check_dims("v", v, 4, "(B, S, Nv, V)")
    _check_dims("W", W, 3, "(Nw, V, V)")
    _check_dims("f", f, 3, "(B, S, Nf)")
    batch, seq_len, _, key_dim = q.shape
    value_dim = v.shape[-1]
    for name, x in (("k", k), ("v", v), ("f", f)):
        if tuple(x.shape[:2]) != (batch, seq_len):
            _fail(f"`{name}` has (B, S) = {tuple(x.shape[:2])} but `q` has {(batch, seq_len)}")
    if k.shape[-1] != key_dim:
        _fail(f"`q` and `k` must share the key head dim K, got {key_dim} and {k.shape[-1]}")
    if tuple(W.shape[1:]) != (value_dim, value_dim):
        _fail(f"`W` must be (Nw, V, V) with V = {value_dim} from `v`, got {tuple(W.shape)}")
    if key_dim < 1 or value_dim < 1:
        _fail(f"head dims must be positive, got K={key_dim}, V={value_dim}")

    counts = {"Nq": q.shape[2], "Nk": k.shape[2], "Nv": v.shape[2], "Nf": f.shape[2], "Nw": W.shape[0]}
    num_heads = max(counts.values())
    for name, count in counts.items():
        if count < 1 or num_heads % count:
            _fail(f"every head count must divide N = max(Nq, Nk, Nv, Nf, Nw) = {num_heads}; {name} = {count}")

    for name, x in (("q", q), ("k", k), ("v", v), ("W", W)):
        if x.dtype not in _INPUT_DTYPES:
            _fail(f"`{name}` must be bfloat16, float16, float32 or float64, got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        _fail(f"`q`, `k`, `v` must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if f.dtype not in (torch.float32, torch.float64):
        _fail(f"`f` must be float32 (a bf16 forget gate freezes heads whose f rounds to 1), got {f.dtype}")
    devices = {x.device for x in (q, k, v, W, f)}
    if initial_state is not None:
        devices.add(initial_state.device)
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
        if cu_seqlens.device != q.device:
            _fail(f"`cu_seqlens` must be on {q.device}, got {cu_seqlens.device}")
        if not torch.compiler.is_compiling():
            bounds = cu_seqlens.tolist()
            if bounds[0] != 0 or bounds[-1] != seq_len or any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
                _fail(f"`cu_seqlens` must rise from 0 to S={seq_len} without decreasing, got {bounds}")
        num_states = len(cu_seqlens) - 1

    if initial_state is not None:
        _check_dims("initial_state", initial_state, 4, "(B, N, K, V)")
        expected = (num_states, num_heads, key_dim, value_dim)
        if tuple(initial_state.shape) != expected:
            _fail(f"`initial_state` must have shape {expected} (states, N, K, V), got {tuple(initial_state.shape)}")
    if gradient_clipping is not None and not gradient_clipping > 0:
        _fail(f"`gradient_clipping` must be a positive number or None, got {gradient_clipping}")
    return num_heads


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
    TRITON_INTERPRET=1) or "auto" (Triton on CUDA when available, else the reference).
    """
    validate_scan_inputs(q, k, v, W, f, initial_state, gradient_clipping, cu_seqlens)
    if not uses_triton(backend, q):
        return m2rnn_scan_reference(q, k, v, W, f, initial_state, gradient_clipping, cu_seqlens)
    from .triton_scan import m2rnn_scan_triton

    return m2rnn_scan_triton(q, k, v, W, f, initial_state, gradient_clipping, cu_seqlens)


def causal_conv1d_step(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """One decode step of a depthwise causal convolution and its SiLU on the Triton kernel, the cached window
    updated in place: x (B, C), conv_state (B, C, k) the last k inputs, weight (C, k). Returns (B, C)."""
    if x.dim() != 2 or conv_state.dim() != 3 or weight.dim() != 2:
        raise ValueError(
            "causal_conv1d_step: expected x (B, C), conv_state (B, C, k), weight (C, k), got shapes "
            f"{tuple(x.shape)}, {tuple(conv_state.shape)}, {tuple(weight.shape)}"
        )
    if tuple(conv_state.shape) != (*x.shape, weight.shape[1]) or weight.shape[0] != x.shape[1]:
        raise ValueError(
            f"causal_conv1d_step: conv_state must be (B, C, k) = {(*x.shape, weight.shape[1])} and weight (C, k) = "
            f"{(x.shape[1], weight.shape[1])}, got {tuple(conv_state.shape)} and {tuple(weight.shape)}"
        )
    from .triton_conv_step import causal_conv1d_step_triton

    return causal_conv1d_step_triton(x, conv_state, weight)


def causal_conv1d_silu(
    x: torch.Tensor,
    weight: torch.Tensor,
    sequence_ids: torch.Tensor | None = None,
    split_sizes: list[int] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """silu(depthwise causal convolution) of whole sequences on the Triton kernels, with gradients for x and weight:
    x (B, S, C), weight (C, k), sequence_ids (B, S) integer ids of the packed sequences of each row (a tap never
    reads across a change of id). Taps before the start read zero. Returns (B, S, C) in the dtype of x; with
    `split_sizes` (at most three widths summing to C), the blocks `out.split(split_sizes, -1)` would give, each
    written to a contiguous tensor of its own."""
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[2]:
        raise ValueError(f"causal_conv1d_silu: expected x (B, S, C) and weight (C, k), got shapes {tuple(x.shape)} "
                         f"and {tuple(weight.shape)}")
    batch_and_steps = tuple(x.shape[:2])
    if sequence_ids is not None and (tuple(sequence_ids.shape) != batch_and_steps or sequence_ids.is_floating_point()):
        raise ValueError(f"causal_conv1d_silu: sequence_ids must be integer ids of shape (B, S) = {batch_and_steps}, "
                         f"got {sequence_ids.dtype} {tuple(sequence_ids.shape)}")
    sizes = [x.shape[2]] if split_sizes is None else list(split_sizes)
    if not 1 <= len(sizes) <= 3 or sum(sizes) != x.shape[2] or min(sizes) < 1:
        raise ValueError(f"causal_conv1d_silu: split_sizes must be one to three positive widths summing to C = "
                         f"{x.shape[2]}, got {split_sizes}")
    from .triton_short_conv import short_conv_op

    blocks = short_conv_op(x, weight, sequence_ids, sizes)
    return blocks[0] if split_sizes is None else tuple(blocks)


def gated_rms_norm(
    y: torch.Tensor,
    g: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    v: torch.Tensor | None = None,
    D: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """weight ⊙ RMSNorm((y + D ⊙ v) ⊙ silu(g)) over the N·V values of each token, on the Triton kernels, with
    gradients for every tensor: y, g, v (B, S, N, V), D (N, V), both None without the residual, weight (N·V,).
    Computes in float32 and returns (B, S, N·V) in `out_dtype`, by default the promoted dtype of the inputs."""
    tensors = [x for x in (y, g, weight, v, D) if x is not None]
    fits = y.dim() == 4 and g.shape == y.shape and weight.shape == (y.shape[2] * y.shape[3],)
    if v is not None or D is not None:
        fits = fits and v is not None and D is not None and v.shape == y.shape and D.shape == y.shape[2:]
    if not fits:
        raise ValueError("gated_rms_norm: expected y, g and v of one shape (B, S, N, V), D (N, V) with v or neither, "
                         f"weight (N·V,); got shapes {[tuple(x.shape) for x in tensors]}")
    from .triton_gated_norm import gated_rms_norm_forward, gated_rms_norm_op

    out_dtype = out_dtype or functools.reduce(torch.promote_types, [x.dtype for x in tensors])
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in tensors)
    # Eager inference and decoding: the op dispatcher would only add host time to a short kernel.
    norm = gated_rms_norm_op if needs_grad or torch.compiler.is_compiling() else gated_rms_norm_forward
    return norm(y, v, D, g, weight, eps, out_dtype)[0]
