"""The gated delta rule in plain PyTorch, a loop over time: the specification the fla kernels are checked against.

Per sequence, head and time step t (the recurrent form of fla's `chunk_gated_delta_rule`;
docs/design.md, "Gated DeltaNet"):

    S_t = exp(g_t) · S_{t-1}                        S: (K, V), g_t <= 0 the log decay
    S_t = S_t + β_t · k_t (v_t − S_tᵀ k_t)ᵀ          the delta rule reads the decayed state
    o_t = S_tᵀ (scale · q_t)                         (V,)

With `qk_l2norm`, q_t and k_t are first divided by sqrt(Σ x² + 1e-6), as fla's `use_qk_l2norm_in_kernel` does.
The loop runs in float32 (float64 for float64 inputs) whatever the input dtype, and autograd differentiates it in
every input, the initial state included.
"""

import torch

L2NORM_EPS = 1e-6   # fla's, inside its kernels


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """x / sqrt(Σ x² + 1e-6) over the last dimension."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + L2NORM_EPS)


def _delta_rule_one_sequence(q, k, v, g, beta, state):
    """q, k: (B, S, H, K); v: (B, S, H, V); g, beta: (B, S, H); state: (B, H, K, V), all in one dtype."""
    outputs = []
    for t in range(q.shape[1]):
        state = state * g[:, t].exp()[..., None, None]
        error = v[:, t] - torch.einsum("bhk,bhkv->bhv", k[:, t], state)                # (B, H, V)
        state = state + k[:, t, ..., None] * (beta[:, t, ..., None] * error)[..., None, :]
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], state))
    o = torch.stack(outputs, dim=1) if outputs else v.new_zeros(v.shape)
    return o, state


def gated_delta_rule_reference(q, k, v, g, beta, scale: float, initial_state=None, cu_seqlens=None,
                               qk_l2norm: bool = False):
    """The op of `kernels.gated_delta_rule` as a loop over time; inputs are assumed validated.

    Returns o (B, S, H, V) in the dtype of `v` and the final state (N, H, K, V) in float32 (float64 for float64
    inputs), N = B, or one state per sequence with `cu_seqlens`.
    """
    output_dtype = v.dtype
    compute_dtype = torch.float64 if v.dtype == torch.float64 else torch.float32
    q, k, v, g, beta = (x.to(compute_dtype) for x in (q, k, v, g, beta))
    if qk_l2norm:
        q, k = l2_normalize(q), l2_normalize(k)
    q = q * scale
    batch, _, num_heads, key_dim = k.shape
    num_states = batch if cu_seqlens is None else len(cu_seqlens) - 1
    if initial_state is None:
        initial_state = q.new_zeros(num_states, num_heads, key_dim, v.shape[-1])
    initial_state = initial_state.to(compute_dtype)

    if cu_seqlens is None:
        o, final_state = _delta_rule_one_sequence(q, k, v, g, beta, initial_state)
        return o.to(output_dtype), final_state

    outputs, final_states = [], []
    for i, (start, end) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
        piece = slice(start, end)
        o_i, state_i = _delta_rule_one_sequence(
            q[:, piece], k[:, piece], v[:, piece], g[:, piece], beta[:, piece], initial_state[i : i + 1]
        )
        outputs.append(o_i)
        final_states.append(state_i)
    return torch.cat(outputs, dim=1).to(output_dtype), torch.cat(final_states, dim=0)
