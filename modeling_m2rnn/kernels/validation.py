"""Input validation of the ops: each raises a ValueError that names the argument and the rule it breaks."""

import torch

_INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def _fail(message: str, op: str = "m2rnn_scan"):
    raise ValueError(f"{op}: {message}")


def _check_dims(name: str, x: torch.Tensor, ndim: int, layout: str, op: str = "m2rnn_scan"):
    if not isinstance(x, torch.Tensor):
        _fail(f"expected `{name}` to be a torch.Tensor of shape {layout}, got {type(x).__name__}", op)
    if x.dim() != ndim:
        _fail(f"expected `{name}` of shape {layout}, got a {x.dim()}-D tensor of shape {tuple(x.shape)}", op)


def _check_one_device(tensors, op: str):
    devices = {x.device for x in tensors if x is not None}
    if len(devices) > 1:
        _fail(f"all inputs must be on one device, got {sorted(str(d) for d in devices)}", op)


def _check_packing(cu_seqlens, batch: int, seq_len: int, op: str) -> int:
    """`cu_seqlens` (num_sequences + 1,) rising from 0 to S, or None; returns the number of states (sequences)."""
    if cu_seqlens is None:
        return batch
    _check_dims("cu_seqlens", cu_seqlens, 1, "(num_sequences + 1,)", op)
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        _fail(f"`cu_seqlens` must be int32 or int64, got {cu_seqlens.dtype}", op)
    if batch != 1:
        _fail(f"with `cu_seqlens` the sequences are packed along S, so B must be 1, got B={batch}", op)
    if len(cu_seqlens) < 2:
        _fail("`cu_seqlens` needs at least two entries, [0, ..., S]", op)
    if not torch.compiler.is_compiling():
        bounds = cu_seqlens.tolist()
        if bounds[0] != 0 or bounds[-1] != seq_len or any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
            _fail(f"`cu_seqlens` must rise from 0 to S={seq_len} without decreasing, got {bounds}", op)
    return len(cu_seqlens) - 1


def _check_initial_state(initial_state, expected: tuple[int, ...], layout: str, op: str):
    if initial_state is None:
        return
    _check_dims("initial_state", initial_state, 4, layout, op)
    if tuple(initial_state.shape) != expected:
        _fail(f"`initial_state` must have shape {expected} {layout}, got {tuple(initial_state.shape)}", op)


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
    _check_one_device((q, k, v, W, f, initial_state, cu_seqlens), "m2rnn_scan")
    num_states = _check_packing(cu_seqlens, batch, seq_len, "m2rnn_scan")
    expected = (num_states, num_heads, key_dim, value_dim)
    _check_initial_state(initial_state, expected, "(states, N, K, V)", "m2rnn_scan")
    if gradient_clipping is not None and not gradient_clipping > 0:
        _fail(f"`gradient_clipping` must be a positive number or None, got {gradient_clipping}")
    return num_heads


def validate_short_conv_inputs(x, weight, sequence_ids, split_sizes) -> list[int]:
    """x (B, S, C), weight (C, k), sequence_ids (B, S) integer or None, split_sizes one to three widths summing to C
    (None: one block). Returns the block widths."""
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
    return sizes


def validate_conv_step_inputs(x, conv_state, weight) -> None:
    """x (B, C), conv_state (B, C, k), weight (C, k)."""
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


def validate_gated_norm_inputs(y, g, weight, v, D) -> None:
    """y (B, S, N, V), g (B, S, Ng, V), v (B, S, Nv, V), D (N, V), v and D both given or both None, weight (N·V,);
    Ng and Nv divide N."""
    tensors = [x for x in (y, g, weight, v, D) if x is not None]

    def groups_of_y(x) -> bool:
        return x.dim() == 4 and x.shape[:2] == y.shape[:2] and x.shape[3] == y.shape[3] and y.shape[2] % x.shape[2] == 0

    fits = y.dim() == 4 and groups_of_y(g) and weight.shape == (y.shape[2] * y.shape[3],)
    if v is not None or D is not None:
        fits = fits and v is not None and D is not None and groups_of_y(v) and D.shape == y.shape[2:]
    if not fits:
        raise ValueError("gated_rms_norm: expected y (B, S, N, V), g and v (B, S, heads dividing N, V), D (N, V) with "
                         f"v or neither, weight (N·V,); got shapes {[tuple(x.shape) for x in tensors]}")


def validate_gated_delta_rule_inputs(q, k, v, g, beta, scale, initial_state, cu_seqlens) -> None:
    """q, k (B, S, H, K), v (B, S, H, V), g and beta (B, S, H), g float32; initial_state (states, H, K, V) float32."""
    op = "gated_delta_rule"
    _check_dims("q", q, 4, "(B, S, H, K)", op)
    _check_dims("k", k, 4, "(B, S, H, K)", op)
    _check_dims("v", v, 4, "(B, S, H, V)", op)
    _check_dims("g", g, 3, "(B, S, H)", op)
    _check_dims("beta", beta, 3, "(B, S, H)", op)
    batch, seq_len, num_heads, key_dim = q.shape
    if tuple(k.shape) != tuple(q.shape):
        _fail(f"`k` must have the shape of `q` (B, S, H, K) = {tuple(q.shape)}, got {tuple(k.shape)}", op)
    if tuple(v.shape[:3]) != (batch, seq_len, num_heads):
        _fail(f"`v` must be (B, S, H, V) with (B, S, H) = {(batch, seq_len, num_heads)} from `q`, got "
              f"{tuple(v.shape)}", op)
    for name, x in (("g", g), ("beta", beta)):
        if tuple(x.shape) != (batch, seq_len, num_heads):
            _fail(f"`{name}` must be (B, S, H) = {(batch, seq_len, num_heads)}, got {tuple(x.shape)}", op)
    if key_dim < 1 or v.shape[-1] < 1:
        _fail(f"head dims must be positive, got K={key_dim}, V={v.shape[-1]}", op)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype not in _INPUT_DTYPES:
            _fail(f"`{name}` must be bfloat16, float16, float32 or float64, got {x.dtype}", op)
    if not (q.dtype == k.dtype == v.dtype):
        _fail(f"`q`, `k`, `v` must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}", op)
    if g.dtype not in (torch.float32, torch.float64):
        _fail(f"`g` must be float32 (in bf16 a log decay near 0 rounds to 0 and freezes its head), got {g.dtype}", op)
    if not beta.is_floating_point():
        _fail(f"`beta` must be a floating-point tensor, got {beta.dtype}", op)
    if scale is not None and not scale > 0:
        _fail(f"`scale` must be a positive number or None (K^-1/2), got {scale}", op)
    _check_one_device((q, k, v, g, beta, initial_state, cu_seqlens), op)
    num_states = _check_packing(cu_seqlens, batch, seq_len, op)
    _check_initial_state(initial_state, (num_states, num_heads, key_dim, v.shape[-1]), "(states, H, K, V)", op)
    if initial_state is not None and initial_state.dtype not in (torch.float32, torch.float64):
        _fail(f"`initial_state` must be float32 (float64 with float64 inputs), got {initial_state.dtype}", op)
