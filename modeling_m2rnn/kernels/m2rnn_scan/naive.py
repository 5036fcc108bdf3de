"""The M2RNN recurrence in plain PyTorch: the specification every other backend is tested against.

Per head n and time step t (docs/design.md, "The recurrence"):

    Z_t = tanh(H_{t-1} · W_n + k_t v_tᵀ)        H: (K, V), W_n: (V, V)
    H_t = f_t · H_{t-1} + (1 − f_t) · Z_t
    y_t = q_tᵀ · H_t                              (V,)

The loop runs in float32 (float64 when the inputs are float64), whatever the input dtype, and is
differentiable by autograd in every input, the initial state included.
"""

import torch


def expand_heads(x: torch.Tensor, num_heads: int, dim: int) -> torch.Tensor:
    """Share each of the `x.shape[dim]` head groups across `num_heads // groups` consecutive heads."""
    groups = x.shape[dim]
    return x if groups == num_heads else x.repeat_interleave(num_heads // groups, dim=dim)


class _ClampGradient(torch.autograd.Function):
    """Identity forward; the backward clamps the whole gradient arriving at the tensor to [-c, c]."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, clip: float) -> torch.Tensor:
        ctx.clip = clip
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.clamp(-ctx.clip, ctx.clip), None


def _scan_one_sequence(q, k, v, W, f, state, gradient_clipping):
    """q, k: (B, S, N, K); v: (B, S, N, V); W: (N, V, V); f: (B, S, N); state: (B, N, K, V), all in one dtype."""
    outputs = []
    for t in range(q.shape[1]):
        f_t = f[:, t, :, None, None]                                      # (B, N, 1, 1)
        z = torch.tanh(state @ W + k[:, t, :, :, None] * v[:, t, :, None, :])
        state = f_t * state + (1 - f_t) * z                               # (B, N, K, V)
        if gradient_clipping is not None:
            state = _ClampGradient.apply(state, gradient_clipping)
        outputs.append(torch.einsum("bnk,bnkv->bnv", q[:, t], state))
    y = torch.stack(outputs, dim=1) if outputs else v.new_zeros(v.shape)
    return y, state


def m2rnn_scan_reference(q, k, v, W, f, initial_state=None, gradient_clipping=None, cu_seqlens=None):
    """`m2rnn_scan` (docs/design.md, "Kernel contracts") as a loop over time. Inputs are assumed validated.

    Returns y (B, S, N, V) in the dtype of `v` and the final state (B, N, K, V), or one per sequence
    with `cu_seqlens`, in float32 (float64 for float64 inputs).
    """
    num_heads = max(q.shape[2], k.shape[2], v.shape[2], f.shape[2], W.shape[0])
    output_dtype = v.dtype
    compute_dtype = torch.float64 if v.dtype == torch.float64 else torch.float32
    q, k, v, f = (expand_heads(x, num_heads, dim=2).to(compute_dtype) for x in (q, k, v, f))
    W = expand_heads(W, num_heads, dim=0).to(compute_dtype)
    batch, _, _, key_dim = q.shape
    value_dim = v.shape[-1]
    num_states = batch if cu_seqlens is None else len(cu_seqlens) - 1
    if initial_state is None:
        initial_state = q.new_zeros(num_states, num_heads, key_dim, value_dim)
    initial_state = initial_state.to(compute_dtype)

    if cu_seqlens is None:
        y, final_state = _scan_one_sequence(q, k, v, W, f, initial_state, gradient_clipping)
        return y.to(output_dtype), final_state

    ys, final_states = [], []
    for i, (start, end) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
        piece = slice(start, end)
        y_i, state_i = _scan_one_sequence(
            q[:, piece], k[:, piece], v[:, piece], W, f[:, piece], initial_state[i : i + 1], gradient_clipping
        )
        ys.append(y_i)
        final_states.append(state_i)
    return torch.cat(ys, dim=1).to(output_dtype), torch.cat(final_states, dim=0)
