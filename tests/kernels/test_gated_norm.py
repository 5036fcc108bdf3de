"""The gated norm op: the Triton kernels against the PyTorch reference in float64. Bounds: helpers.BOUND."""

import pytest
import torch

from modeling_m2rnn.kernels import gated_rms_norm, gated_rms_norm_reference
from modeling_m2rnn.kernels.gated_norm import triton as triton_gated_norm

from helpers import BOUND, DEVICE, relative_error


def gated_norm_inputs(dtype, residual: bool, generator) -> dict:
    """Fresh inputs of odd sizes: 2 × 9 tokens, N = 3 heads of V = 7 (21 values in a block of 32); D and the
    norm weight away from their initial ones."""
    shape = (2, 9, 3, 7)
    tensors = dict(y=torch.randn(*shape, generator=generator).to(dtype),
                   g=torch.randn(*shape, generator=generator).to(dtype),
                   weight=1 + 0.3 * torch.randn(21, generator=generator))
    if residual:
        tensors.update(v=torch.randn(*shape, generator=generator).to(dtype), D=torch.randn(3, 7, generator=generator))
    return tensors


@pytest.mark.parametrize("dtype, residual", [(torch.float32, True), (torch.bfloat16, True), (torch.float32, False)])
def test_gated_rms_norm_matches_float64(dtype, residual, monkeypatch):
    """out and the gradients of y, g, v, D and the norm weight against the layer's PyTorch code in float64. The 18
    tokens make partial tiles: four per forward program, and five per backward program (four programs, the last
    one partial, whose dD and weight partials are summed). Bounds as the scan's: float32 sums, bf16 rounds out and
    the input gradients once."""
    for name, value in (("FORWARD_TILE", 4), ("BACKWARD_ROWS", 5)):
        monkeypatch.setattr(triton_gated_norm, name, value)
    tensors = gated_norm_inputs(dtype, residual, torch.Generator().manual_seed(11))
    dout = torch.randn(2, 9, 21, dtype=torch.float64)
    leaves64 = {name: x.double().requires_grad_() for name, x in tensors.items()}
    reference = gated_rms_norm_reference(eps=1e-6, **leaves64)
    reference_grads = torch.autograd.grad(reference, list(leaves64.values()), dout)

    leaves = {name: x.to(DEVICE).requires_grad_() for name, x in tensors.items()}
    out = gated_rms_norm(eps=1e-6, backend="triton", **leaves)
    grads = torch.autograd.grad(out, list(leaves.values()), dout.to(DEVICE, out.dtype))
    assert out.dtype == torch.float32 and out.shape == (2, 9, 21)   # float32 weight and D promote
    with torch.no_grad():   # inference launches the kernel without the op
        assert torch.equal(gated_rms_norm(eps=1e-6, backend="triton", **leaves), out)
    assert relative_error(out, reference) < BOUND[dtype]
    for (name, x), grad, reference_grad in zip(leaves.items(), grads, reference_grads):
        assert grad.dtype == x.dtype and grad.shape == x.shape
        assert relative_error(grad, reference_grad) < BOUND[dtype], name


def test_gated_rms_norm_op_passes_opcheck_and_rejects_bad_shapes():
    g = torch.Generator().manual_seed(12)
    for residual in (True, False):
        tensors = {name: x.to(DEVICE).requires_grad_() for name, x in gated_norm_inputs(torch.float32, residual,
                                                                                          g).items()}
        args = (tensors["y"], tensors.get("v"), tensors.get("D"), tensors["g"], tensors["weight"], 1e-5,
                torch.bfloat16)
        torch.library.opcheck(triton_gated_norm.gated_rms_norm_op, args,
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    compiled = torch.compile(gated_rms_norm, backend="aot_eager", fullgraph=True)   # no graph break
    assert torch.equal(compiled(eps=1e-5, backend="triton", **tensors),
                       gated_rms_norm(eps=1e-5, backend="triton", **tensors))
    y, v, D = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), torch.randn(3, 4)
    for bad in (dict(g=y[..., :3], weight=torch.ones(12)), dict(g=y, weight=torch.ones(11)),
                dict(g=y, weight=torch.ones(12), v=v), dict(g=y, weight=torch.ones(12), v=v, D=D[:2])):
        with pytest.raises(ValueError, match="gated_rms_norm: expected"):
            gated_rms_norm(y, eps=1e-5, backend="triton", **bad)
