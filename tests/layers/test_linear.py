"""The model's Linear: nn.Linear, except that a compiled single-row product is a multiply-and-sum reduction."""

import pytest
import torch
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code

from modeling_m2rnn.layers import Linear


def compiled_output_and_code(layer, x):
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)
    out, code = run_and_get_code(compiled, x)
    return out, "\n".join(code)


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])   # without grad x and y go through buffers
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_compiled_single_row_is_a_reduction_that_matches_float64(bias, dtype, grad):
    torch.manual_seed(0)
    layer = Linear(37, 23, bias=bias).to(dtype)
    x = torch.randn(1, 1, 37, dtype=dtype)
    with torch.set_grad_enabled(grad):
        out, code = compiled_output_and_code(layer, x)
    reference = F.linear(x.double(), layer.weight.double(), None if layer.bias is None else layer.bias.double())
    bound = 1e-6 if dtype == torch.float32 else 8e-3   # float32 accumulation, then one rounding to the output dtype
    assert out.dtype == dtype and out.shape == (1, 1, 23)
    assert ((out.double() - reference).norm() / reference.norm()).item() < bound
    assert "extern_kernels.mm" not in code and "extern_kernels.addmm" not in code


def test_several_rows_eager_and_autocast_go_through_f_linear():
    torch.manual_seed(0)
    layer = Linear(37, 23)
    rows = torch.randn(3, 37)
    out, code = compiled_output_and_code(layer, rows)
    assert "extern_kernels.addmm" in code
    torch.testing.assert_close(out, F.linear(rows, layer.weight, layer.bias))
    one_row = rows[:1]
    assert torch.equal(layer(one_row), F.linear(one_row, layer.weight, layer.bias))   # eager: exactly nn.Linear
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, code = compiled_output_and_code(layer, one_row)
    assert out.dtype == torch.bfloat16 and "extern_kernels" in code


@pytest.mark.parametrize("bias", [False, True])
def test_forward_blocks_are_the_split_output_each_in_its_own_buffer(bias):
    """forward_blocks(x, sizes) == forward(x).split(sizes), with gradients, each block contiguous; a compiled single
    row stays one reduction."""
    torch.manual_seed(0)
    sizes = [6, 5, 9]
    layer = Linear(13, sum(sizes), bias=bias).double()
    x = torch.randn(3, 7, 13, dtype=torch.float64, requires_grad=True)
    blocks = layer.forward_blocks(x, sizes)
    expected = layer(x).split(sizes, dim=-1)
    assert all(block.is_contiguous() for block in blocks)
    for block, reference in zip(blocks, expected):
        torch.testing.assert_close(block, reference, rtol=1e-12, atol=1e-12)
    weights = [torch.randn_like(block) for block in blocks]
    grads = torch.autograd.grad(sum((b * w).sum() for b, w in zip(blocks, weights)), [x, layer.weight])
    reference_grads = torch.autograd.grad(sum((b * w).sum() for b, w in zip(expected, weights)), [x, layer.weight])
    for grad, reference in zip(grads, reference_grads):
        torch.testing.assert_close(grad, reference, rtol=1e-12, atol=1e-12)

    torch._dynamo.reset()
    single = torch.randn(1, 1, 13, dtype=torch.float64)
    compiled = torch.compile(lambda x: layer.forward_blocks(x, sizes), fullgraph=True, dynamic=False)
    with torch.no_grad():
        out, code = run_and_get_code(compiled, single)
    assert "extern_kernels.mm" not in "\n".join(code) and "extern_kernels.addmm" not in "\n".join(code)
    for block, reference in zip(out, layer(single).split(sizes, dim=-1)):   # the reduction accumulates in float32
        assert ((block - reference).norm() / reference.norm()).item() < 1e-6
