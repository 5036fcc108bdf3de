"""The short convolution op: the PyTorch reference against F.conv1d, and the Triton kernels (whole sequences and
the decode step) against the reference in float64. Bounds: helpers.BOUND."""

import pytest
import torch
import torch.nn.functional as F

from modeling_m2rnn.kernels import causal_conv1d, causal_conv1d_silu, causal_conv1d_step
from modeling_m2rnn.kernels.short_conv.triton_decode_step import conv_step_op
from modeling_m2rnn.kernels.short_conv.triton_whole_sequence import short_conv_op

from helpers import BOUND, DEVICE, relative_error


def triton_conv_silu(x, weight, sequence_ids=None, split_sizes=None):
    """The whole-sequence op on the Triton backend: its blocks, or the one tensor without `split_sizes`."""
    blocks, window = causal_conv1d_silu(x, weight, split_sizes, sequence_ids=sequence_ids, backend="triton")
    assert window is None   # no context, nothing to cache
    return blocks if split_sizes is not None else blocks[0]


def triton_conv_step(x, conv_state, weight):
    return causal_conv1d_step(x, conv_state, weight, backend="triton")


@pytest.mark.parametrize("seq_len, context_len", [(11, None), (1, None), (1, 5), (6, 9)],
                         ids=["fresh", "one_token", "decode_step", "continuation"])
def test_short_conv_is_a_causal_depthwise_conv1d(seq_len, context_len):
    """The shifted-product conv equals F.conv1d on the zero-padded window: float64 to rounding, bf16 within 2^-7
    of the float64 output's scale (each product and partial sum rounds to bf16)."""
    g = torch.Generator().manual_seed(seq_len * 10 + (context_len or 0))
    batch, channels, kernel_size = 3, 7, 4
    x = torch.randn(batch, seq_len, channels, generator=g, dtype=torch.float64)
    weight = torch.randn(channels, kernel_size, generator=g, dtype=torch.float64)
    context = None
    if context_len is not None:   # a cache's window: earlier inputs, then x
        context = torch.cat([torch.randn(batch, channels, context_len - seq_len, generator=g, dtype=torch.float64),
                             x.transpose(1, 2)], dim=-1)
    window = x.transpose(1, 2) if context is None else context
    padded = F.pad(window, (kernel_size - 1, 0))[..., -(kernel_size - 1 + seq_len):]
    expected = F.conv1d(padded, weight.unsqueeze(1), groups=channels).transpose(1, 2)

    out, last_inputs = causal_conv1d(x, weight, context)
    assert out.shape == (batch, seq_len, channels)
    assert (out - expected).abs().max() <= 1e-12 * expected.abs().max()
    assert torch.equal(last_inputs, padded[..., -kernel_size:])
    out_bf16, _ = causal_conv1d(x.bfloat16(), weight, None if context is None else context.bfloat16())
    assert out_bf16.dtype == torch.bfloat16
    assert (out_bf16.double() - expected).abs().max() <= 2**-7 * expected.abs().max()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype, kernel_size", [(torch.float32, 4), (torch.bfloat16, 3)])
def test_conv_step_matches_reference_and_shifts_the_window(dtype, kernel_size, backend):
    """One decode step of the short conv: silu(Σ_j w_j · window_j) with window = (cached inputs 1..k-1, x), and the
    cache becomes that window, on the kernel and on the PyTorch reference. x is a strided view (the model's is a
    slice of the input projection)."""
    g = torch.Generator().manual_seed(7)
    batch, channels = 3, 141   # more than one program of channels, the last one partial
    x = torch.randn(batch, channels + 9, generator=g).to(dtype)[:, 5:5 + channels]
    conv_state = torch.randn(batch, channels, kernel_size, generator=g).to(dtype)
    weight = torch.randn(channels, kernel_size, generator=g)
    window = torch.cat([conv_state[..., 1:], x[..., None]], dim=-1)
    reference = torch.nn.functional.silu((window.double() * weight.double()).sum(-1))
    out = causal_conv1d_step(x.to(DEVICE), conv_state := conv_state.to(DEVICE), weight.to(DEVICE), backend=backend)
    assert out.dtype == dtype and out.shape == (batch, channels)
    assert relative_error(out, reference) < BOUND[dtype]
    assert torch.equal(conv_state.cpu(), window)


def test_conv_step_op_passes_opcheck_and_rejects_bad_shapes():
    x, conv_state, weight = torch.randn(2, 5, device=DEVICE), torch.randn(2, 5, 4, device=DEVICE), torch.randn(5, 4)
    torch.library.opcheck(conv_step_op, (x, conv_state, weight.to(DEVICE)),
                          test_utils=("test_schema", "test_faketensor"))
    compiled_state, eager_state = conv_state.clone(), conv_state.clone()
    step = torch.compile(triton_conv_step, backend="aot_eager", fullgraph=True)   # the op mutates under tracing
    assert torch.equal(step(x, compiled_state, weight), triton_conv_step(x, eager_state, weight))
    assert torch.equal(compiled_state, eager_state) and not torch.equal(eager_state, conv_state)
    with pytest.raises(ValueError, match="conv_state"):
        causal_conv1d_step(x, conv_state[..., :3], weight)
    with pytest.raises(ValueError, match="x"):
        causal_conv1d_step(x[None], conv_state, weight)


@pytest.mark.parametrize("dtype, kernel_size, packed, split_sizes", [
    (torch.float32, 4, False, None), (torch.float32, 3, True, [70, 1]), (torch.bfloat16, 4, True, [13, 5, 53]),
], ids=["fp32", "fp32_packed_split2", "bf16_packed_split3"])
def test_short_conv_forward_and_backward_match_float64(dtype, kernel_size, packed, split_sizes):
    """silu(causal depthwise conv) of whole rows against the layer's PyTorch conv in float64: out, dx, dweight.
    Odd sizes: 67 steps (two time blocks, the last partial), 71 channels (two channel blocks); packed rows hold
    sequences of length 1 and a sequence crossing the time blocks; the output split into blocks of odd widths, one
    of them 1 wide, their edges inside a channel block. Bounds as the scan's (float32 products and sums; bf16
    rounds out and dx)."""
    g = torch.Generator().manual_seed(kernel_size)
    batch, seq_len, channels = 2, 67, 71
    x = torch.randn(batch, seq_len, channels, generator=g).to(dtype)
    weight = torch.randn(channels, kernel_size, generator=g)
    dout = torch.randn(batch, seq_len, channels, generator=g).to(dtype)
    sequence_ids = None
    if packed:
        starts = torch.zeros(batch, seq_len, dtype=torch.long)
        starts[0, [5, 6, 7, 50]] = 1   # sequences of length 1 at 5 and 6
        starts[1, [1, 66]] = 1         # and at the very end of the row
        sequence_ids = starts.cumsum(1)

    x64, weight64 = x.double().requires_grad_(), weight.double().requires_grad_()
    reference = torch.nn.functional.silu(causal_conv1d(x64, weight64, sequence_ids=sequence_ids)[0])
    reference_dx, reference_dweight = torch.autograd.grad(reference, (x64, weight64), dout.double())

    x_dev, weight_dev = x.to(DEVICE).requires_grad_(), weight.to(DEVICE).requires_grad_()
    ids_dev = sequence_ids.to(DEVICE) if packed else None
    out = triton_conv_silu(x_dev, weight_dev, ids_dev, split_sizes)
    if split_sizes is not None:
        assert [block.shape for block in out] == [(batch, seq_len, size) for size in split_sizes]
        assert all(block.is_contiguous() for block in out)
        dx, dweight = torch.autograd.grad(out, (x_dev, weight_dev), dout.to(DEVICE).split(split_sizes, dim=-1))
        out = torch.cat(out, dim=-1)
    else:
        dx, dweight = torch.autograd.grad(out, (x_dev, weight_dev), dout.to(DEVICE))
    assert out.dtype == dtype and dx.dtype == dtype and dweight.dtype == torch.float32
    assert relative_error(out, reference) < BOUND[dtype]
    assert relative_error(dx, reference_dx) < BOUND[dtype]
    assert relative_error(dweight, reference_dweight) < BOUND[dtype]


def test_short_conv_op_passes_opcheck_and_rejects_bad_shapes():
    g = torch.Generator().manual_seed(3)
    x, weight = torch.randn(2, 9, 5, generator=g), torch.randn(5, 4, generator=g)
    ids = torch.tensor([[0] * 4 + [1] * 5, [0] * 9])
    for sequence_ids, split_sizes in ((None, [5]), (ids.to(DEVICE), [2, 1, 2])):
        torch.library.opcheck(short_conv_op, (x.to(DEVICE).requires_grad_(), weight.to(DEVICE).requires_grad_(),
                                              sequence_ids, split_sizes),
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    compiled = torch.compile(triton_conv_silu, backend="aot_eager", fullgraph=True)   # no graph break
    for fn in (triton_conv_silu, compiled):
        x_grad, weight_grad = x.to(DEVICE).requires_grad_(), weight.to(DEVICE).requires_grad_()
        fn(x_grad, weight_grad, ids.to(DEVICE)).sum().backward()
        if fn is triton_conv_silu:
            expected = x_grad.grad, weight_grad.grad
    assert torch.equal(x_grad.grad, expected[0]) and torch.equal(weight_grad.grad, expected[1])
    with pytest.raises(ValueError, match="weight"):
        triton_conv_silu(x, weight[:4])
    with pytest.raises(ValueError, match="sequence_ids"):
        triton_conv_silu(x, weight, ids[:, :8])
    for split_sizes in ([2, 2], [1, 1, 1, 2], [5, 0]):
        with pytest.raises(ValueError, match="split_sizes"):
            triton_conv_silu(x, weight, None, split_sizes)
