"""Checks of `m2rnn_scan(backend="triton")` against the float64 reference, shared by the Triton and the Gluon
kernels' tests: fresh inputs, and y, the final state and every gradient compared. Error measure and bounds:
helpers.BOUND."""

import torch

from modeling_m2rnn.kernels import m2rnn_scan, m2rnn_scan_reference

from helpers import BOUND, DEVICE, relative_error

NAMES = ("q", "k", "v", "W", "f", "initial_state")


def make_inputs(B, S, K, V, counts, dtype, with_initial_state, num_states=None, generator=None):
    """Fresh random inputs; counts = (Nq, Nk, Nv, Nf, Nw). f in (0.3, 0.95): states move visibly."""
    nq, nk, nv, nf, nw = counts
    n = max(counts)
    g = generator
    q = torch.randn(B, S, nq, K, generator=g)
    k = torch.randn(B, S, nk, K, generator=g) / K**0.5
    v = torch.randn(B, S, nv, V, generator=g)
    W = torch.randn(nw, V, V, generator=g) / V**0.5
    f = 0.3 + 0.65 * torch.rand(B, S, nf, generator=g)
    h0 = 0.5 * torch.randn(num_states or B, n, K, V, generator=g) if with_initial_state else None
    inputs = [q.to(dtype), k.to(dtype), v.to(dtype), W.to(dtype), f, h0]
    return [x.to(DEVICE) if x is not None else None for x in inputs]


def run_with_grads(scan, inputs, output_grads=None, **kwargs):
    """y, final state, the gradients of <y, dy> + <final, d_final> wrt every input, and (dy, d_final): given, or
    drawn (standard normal, like y and the final state) when output_grads is None."""
    inputs = [x.detach().clone().requires_grad_() if x is not None else None for x in inputs]
    y, final_state = scan(*inputs, **kwargs)
    if output_grads is None:
        output_grads = (torch.randn_like(y), torch.randn_like(final_state))
    dy, d_final = output_grads
    loss = (y.double() * dy).sum() + (final_state.double() * d_final).sum()
    leaves = [x for x in inputs if x is not None]
    grads = iter(torch.autograd.grad(loss, leaves))
    return y, final_state, [next(grads) if x is not None else None for x in inputs], output_grads


def check_against_reference(inputs, gradient_clipping=None, cu_seqlens=None):
    """Triton (input dtype) vs the reference on float64 copies: y, final state, every gradient."""
    dtype = inputs[0].dtype
    as_double = [x.double() if x is not None else None for x in inputs]

    def reference(q, k, v, W, f, initial_state):
        return m2rnn_scan_reference(q, k, v, W, f, initial_state, gradient_clipping, cu_seqlens)

    ref_y, ref_final, ref_grads, output_grads = run_with_grads(reference, as_double)
    y, final_state, grads, _ = run_with_grads(
        m2rnn_scan, inputs, output_grads, gradient_clipping=gradient_clipping, cu_seqlens=cu_seqlens, backend="triton"
    )
    assert y.dtype == dtype and final_state.dtype == torch.float32
    errors = {"y": relative_error(y, ref_y), "final_state": relative_error(final_state, ref_final)}
    for name, grad, ref_grad in zip(NAMES, grads, ref_grads):
        if ref_grad is not None:
            assert grad.dtype == inputs[NAMES.index(name)].dtype and grad.shape == ref_grad.shape
            errors["d" + name] = relative_error(grad, ref_grad)
    assert all(e < BOUND[dtype] for e in errors.values()), errors
    return errors
