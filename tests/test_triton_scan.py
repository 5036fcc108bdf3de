"""The Triton scan kernels against the float64 PyTorch reference.

On a machine without CUDA they run through the Triton interpreter (TRITON_INTERPRET=1, set here and
in conftest.py before triton is imported), so the shapes are tiny. Error measure: ‖out − ref‖ / ‖ref‖.
Bounds: float32 inputs compute in float32 (products in full float32): 1e-5 (seen: ~2e-7). bf16 inputs
round y and the gradients to bf16 (2^-9 per element): 1e-2 (seen: ~4e-3). fp16 inputs: 5e-3
(seen: ~3e-4 in the interpreter; the GPU's tanh.approx adds ~5e-4).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from modeling_m2rnn.kernels import (
    causal_conv1d_silu, causal_conv1d_step, gated_rms_norm, m2rnn_scan, m2rnn_scan_reference,
)
from modeling_m2rnn.kernels import triton_gated_norm, triton_scan
from modeling_m2rnn.kernels.triton_conv_step import conv_step_op
from modeling_m2rnn.kernels.triton_short_conv import short_conv_op
from modeling_m2rnn.layers import causal_conv1d, gated_rms_norm_torch
from modeling_m2rnn.kernels.triton_scan import KernelConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BOUND = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 5e-3}
NAMES = ("q", "k", "v", "W", "f", "initial_state")


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


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


def run_with_grads(scan, inputs, output_grads, **kwargs):
    """y, final state and the gradients of <y, dy> + <final, d_final> wrt every input."""
    inputs = [x.detach().clone().requires_grad_() if x is not None else None for x in inputs]
    y, final_state = scan(*inputs, **kwargs)
    dy, d_final = output_grads
    loss = (y.double() * dy).sum() + (final_state.double() * d_final).sum()
    leaves = [x for x in inputs if x is not None]
    grads = iter(torch.autograd.grad(loss, leaves))
    return y, final_state, [next(grads) if x is not None else None for x in inputs]


def check_against_reference(inputs, gradient_clipping=None, cu_seqlens=None):
    """Triton (input dtype) vs the reference on float64 copies: y, final state, every gradient."""
    dtype = inputs[0].dtype
    as_double = [x.double() if x is not None else None for x in inputs]

    def reference(q, k, v, W, f, initial_state):
        return m2rnn_scan_reference(q, k, v, W, f, initial_state, gradient_clipping, cu_seqlens)

    with torch.no_grad():
        ref_y, ref_final = reference(*as_double)
    output_grads = (torch.randn_like(ref_y), torch.randn_like(ref_final))
    ref_y, ref_final, ref_grads = run_with_grads(reference, as_double, output_grads)
    y, final_state, grads = run_with_grads(
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


@pytest.fixture(params=["default", "small_chunks"])
def kernel_config(request, monkeypatch):
    """The default launch, and one with 4-step chunks, 16-row forward and 32-row backward blocks,
    2 heads per program on 2 warps in both kernels and one chunk per backward launch, so that short
    sequences cross checkpoint and segment boundaries (packed ones mid-chunk), K=20, 24, 48 end in
    part-filled row blocks (whose padding rows the backward reads from checkpoints the forward wrote
    in other blocks) and heads are summed inside a program."""
    if request.param != "default":
        monkeypatch.setattr(
            triton_scan, "CONFIG",
            KernelConfig(chunk=4, forward_rows=16, forward_heads_per_program=2, forward_warps=2, backward_rows=32,
                         backward_max_heads_per_program=2, backward_warps=2, backward_partials_mib=0),
        )
    return request.param


CASES = {
    # name: (B, S, K, V, (Nq, Nk, Nv, Nf, Nw), initial state, gradient clipping)
    "shared_qk_odd_dims": (2, 7, 48, 12, (1, 1, 4, 4, 2), True, 0.3),
    "per_head_no_state": (1, 33, 16, 16, (2, 2, 2, 2, 2), False, None),
    "single_step": (3, 1, 20, 5, (1, 2, 4, 4, 4), True, None),
    "mixed_groups_clip": (2, 9, 32, 8, (2, 4, 1, 4, 1), True, 0.2),
}


@pytest.mark.parametrize("case", CASES)
def test_float32_matches_reference(case, kernel_config):
    B, S, K, V, counts, with_state, clip = CASES[case]
    check_against_reference(make_inputs(B, S, K, V, counts, torch.float32, with_state), gradient_clipping=clip)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_inputs_match_reference(dtype):
    check_against_reference(make_inputs(2, 7, 48, 12, (1, 1, 4, 4, 4), dtype, True), gradient_clipping=0.3)


def test_packed_sequences_match_reference(kernel_config):
    cu_seqlens = torch.tensor([0, 1, 6, 7, 7, 15], device=DEVICE)  # lengths 1, 5, 1, 0, 8
    inputs = make_inputs(1, 15, 24, 6, (1, 1, 2, 2, 2), torch.float32, True, num_states=5)
    check_against_reference(inputs, gradient_clipping=0.3, cu_seqlens=cu_seqlens)


def test_initial_state_without_grad():
    inputs = make_inputs(2, 5, 16, 8, (1, 1, 2, 2, 2), torch.float32, True)
    q, k, v, W, f, h0 = inputs
    leaves = [x.clone().requires_grad_() for x in (q, k, v, W, f)]
    y, final_state = m2rnn_scan(*leaves, initial_state=h0, backend="triton")
    (y.sum() + final_state.sum()).backward()
    assert h0.grad is None and all(x.grad is not None for x in leaves)
    ref_y, _ = m2rnn_scan_reference(*(x.double() for x in (q, k, v, W, f)), h0.double())
    assert relative_error(y, ref_y) < BOUND[torch.float32]


def test_gradient_through_the_final_state_only():
    """y unused: the backward gets no dy and must still produce every gradient (dq = 0)."""
    inputs = make_inputs(1, 5, 16, 8, (1, 1, 2, 2, 2), torch.float32, False)[:5]
    leaves = [x.clone().requires_grad_() for x in inputs]
    grads = torch.autograd.grad(m2rnn_scan(*leaves, backend="triton")[1].square().sum(), leaves)
    doubles = [x.double().requires_grad_() for x in inputs]
    ref_grads = torch.autograd.grad(m2rnn_scan_reference(*doubles)[1].square().sum(), doubles, allow_unused=True)
    assert ref_grads[0] is None and torch.count_nonzero(grads[0]) == 0
    for grad, ref_grad in zip(grads[1:], ref_grads[1:]):
        assert relative_error(grad, ref_grad) < BOUND[torch.float32]


def test_the_clip_value_used_above_clips():
    """Without this, the clipped cases above could pass on a kernel that ignores clipping."""
    B, S, K, V, counts, with_state, clip = CASES["shared_qk_odd_dims"]
    inputs = [x.double() if x is not None else None for x in make_inputs(B, S, K, V, counts, torch.float32, with_state)]
    output_grads = (torch.randn(B, S, max(counts), V, dtype=torch.float64, device=DEVICE),
                    torch.randn(B, max(counts), K, V, dtype=torch.float64, device=DEVICE))
    grads = {c: run_with_grads(m2rnn_scan_reference, inputs, output_grads, gradient_clipping=c)[2] for c in (clip, None)}
    assert relative_error(grads[clip][2], grads[None][2]) > 0.05  # dv changes visibly


def test_inference_and_decode_match_reference():
    """No gradient needed: no checkpoints are stored, and S == 1 is the decode step."""
    for S in (1, 6):
        q, k, v, W, f, h0 = make_inputs(3, S, 40, 10, (1, 1, 4, 4, 4), torch.bfloat16, True)
        with torch.no_grad():
            y, final_state, checkpoints = triton_scan.scan_op(q, k, v, W, f, h0, None, None, False)
        ref_y, ref_final = m2rnn_scan_reference(*(x.double() for x in (q, k, v, W, f, h0)))
        assert checkpoints.numel() == 0
        assert relative_error(y, ref_y) < BOUND[torch.bfloat16]
        assert relative_error(final_state, ref_final) < BOUND[torch.bfloat16]


def test_float64_inputs_use_the_reference():
    inputs = make_inputs(1, 4, 8, 4, (1, 1, 2, 2, 2), torch.float64, True)
    y, final_state = m2rnn_scan(*inputs[:5], initial_state=inputs[5], backend="triton")
    ref_y, ref_final = m2rnn_scan_reference(*inputs)
    assert final_state.dtype == torch.float64
    assert torch.equal(y, ref_y) and torch.equal(final_state, ref_final)


def test_ops_pass_opcheck_and_compile_without_graph_breaks():
    q, k, v, W, f, h0 = make_inputs(1, 3, 16, 4, (1, 1, 2, 2, 2), torch.float32, True)
    leaves = [x.requires_grad_() for x in (q, k, v, W, f, h0)]
    torch.library.opcheck(triton_scan.scan_op, (*leaves[:5], leaves[5], None, 0.5, True),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    # The backward op on a strided q (the model's q is a view of a projection): the fake outputs must have
    # the real ones' strides, or a compiled training step fails on them.
    strided_q = q.detach().transpose(1, 3).contiguous().transpose(1, 3)
    assert not strided_q.is_contiguous()
    _, _, checkpoints = triton_scan.scan_op(strided_q, k, v, W, f, h0, None, 0.5, True)
    dy = torch.randn(1, 3, 2, 4, device=DEVICE)
    torch.library.opcheck(triton_scan.scan_backward_op,
                          (strided_q, k.detach(), v.detach(), W.detach(), f.detach(), None, checkpoints.detach(), dy,
                           None, 0.5, torch.float32),
                          test_utils=("test_schema", "test_faketensor"))

    def loss(*xs):
        y, final_state = m2rnn_scan(*xs[:5], initial_state=xs[5], gradient_clipping=0.5, backend="triton")
        return y.sum() + final_state.square().sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    eager_grads = torch.autograd.grad(loss(*leaves), leaves)
    compiled_grads = torch.autograd.grad(compiled(*leaves), leaves)
    for eager, traced in zip(eager_grads, compiled_grads):
        assert relative_error(traced, eager) < 1e-6


def test_gpu_only_paths_are_chosen_as_documented():
    """The inline-assembly paths (fast tanh, lane sums) and the register cap go to GPU launches only, and the
    lane sums only to 16-bit inputs on one-warp, one-head programs (the layout they assume, as checked on the GPU)."""
    config = KernelConfig()
    gpu_bf16 = triton_scan.dot_constants(torch.bfloat16, True, config, warps=1, heads=1)
    assert gpu_bf16["FAST_TANH"] and gpu_bf16["LANE_SUMS"]
    assert not triton_scan.dot_constants(torch.bfloat16, True, config, warps=2, heads=1)["LANE_SUMS"]
    assert not triton_scan.dot_constants(torch.bfloat16, True, config, warps=1, heads=2)["LANE_SUMS"]
    assert not triton_scan.dot_constants(torch.bfloat16, True, KernelConfig(lane_sums=False), 1, 1)["LANE_SUMS"]
    for dtype, on_gpu in ((torch.float32, True), (torch.bfloat16, False)):
        constants = triton_scan.dot_constants(dtype, on_gpu, config, warps=1, heads=1)
        assert not constants["FAST_TANH"] and not constants["LANE_SUMS"]
    assert triton_scan._register_cap(torch.device("cuda"), 184) == {"maxnreg": 184}
    assert triton_scan._register_cap(torch.device("cpu"), 184) == {}
    assert triton_scan._register_cap(torch.device("cuda"), None) == {}


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layout", ["programs", "row_blocks"])
def test_partials_are_summed_in_float32_into_their_slice(out_dtype, layout):
    """Partials summed into a slice (B, steps, groups, K) of a (B, S, groups, K) gradient: the dq, dk partials
    (B, steps, programs, K), consecutive programs per group, and the dv partials (R, B, steps, N, V) of the row
    blocks. fp16 inputs keep float32 dq, dk partials, and one beyond fp16's range must still sum into a finite value;
    16-bit partials are summed with float32 accumulation, rounding once. Odd sizes: 3 groups of 7 partials, K = 12."""
    g = torch.Generator().manual_seed(5)
    partial_dtype = torch.bfloat16 if out_dtype == torch.bfloat16 else torch.float32
    if layout == "programs":
        partial = torch.randn(2, 5, 21, 12, generator=g).to(partial_dtype)
        partial[0, 0, :2, 0] = torch.tensor([70000.0, -69000.0])
        terms = partial.double().view(2, 5, 3, 7, 12)
        members = triton_scan._grouped(partial.to(DEVICE), 2, 3)
    else:
        partial = torch.randn(7, 2, 5, 3, 12, generator=g).to(partial_dtype)
        terms = partial.double().permute(1, 2, 3, 0, 4)
        members = partial.to(DEVICE).permute(1, 2, 3, 0, 4)
    out = torch.zeros(2, 9, 3, 12, dtype=out_dtype, device=DEVICE)
    triton_scan._sum_partials_into(out[:, 2:7], members)
    expected = terms.sum(3)
    # within one rounding to out's dtype (a 16-bit accumulation would be several), plus float32's own on the terms
    bound = expected.abs() * torch.finfo(out_dtype).eps + terms.abs().sum(3) * 2**-22
    assert ((out[:, 2:7].cpu().double() - expected).abs() <= bound).all()
    assert not out[:, :2].any() and not out[:, 7:].any()
    with pytest.raises(ValueError, match="partials"):
        triton_scan._sum_partials_into(out[:, 2:7], members[:, :4])


def test_bad_input_raises_value_error():
    q, k, v, W, f, _ = make_inputs(1, 3, 16, 4, (1, 1, 2, 2, 2), torch.float32, False)
    with pytest.raises(ValueError, match="W"):
        m2rnn_scan(q, k, v, W[:, :3], f, backend="triton")
    with pytest.raises(ValueError, match="f"):
        m2rnn_scan(q, k, v, W, f.bfloat16(), backend="triton")


@pytest.mark.parametrize("dtype, kernel_size", [(torch.float32, 4), (torch.bfloat16, 3)])
def test_conv_step_matches_reference_and_shifts_the_window(dtype, kernel_size):
    """One decode step of the short conv: silu(Σ_j w_j · window_j) with window = (cached inputs 1..k-1, x), and the
    cache becomes that window. x is a strided view (the model's is a slice of the input projection)."""
    g = torch.Generator().manual_seed(7)
    batch, channels = 3, 141   # more than one program of channels, the last one partial
    x = torch.randn(batch, channels + 9, generator=g).to(dtype)[:, 5:5 + channels]
    conv_state = torch.randn(batch, channels, kernel_size, generator=g).to(dtype)
    weight = torch.randn(channels, kernel_size, generator=g)
    window = torch.cat([conv_state[..., 1:], x[..., None]], dim=-1)
    reference = torch.nn.functional.silu((window.double() * weight.double()).sum(-1))
    out = causal_conv1d_step(x.to(DEVICE), conv_state := conv_state.to(DEVICE), weight.to(DEVICE))
    assert out.dtype == dtype and out.shape == (batch, channels)
    assert relative_error(out, reference) < BOUND[dtype]
    assert torch.equal(conv_state.cpu(), window)


def test_conv_step_op_passes_opcheck_and_rejects_bad_shapes():
    x, conv_state, weight = torch.randn(2, 5, device=DEVICE), torch.randn(2, 5, 4, device=DEVICE), torch.randn(5, 4)
    torch.library.opcheck(conv_step_op, (x, conv_state, weight.to(DEVICE)),
                          test_utils=("test_schema", "test_faketensor"))
    compiled_state, eager_state = conv_state.clone(), conv_state.clone()
    step = torch.compile(causal_conv1d_step, backend="aot_eager", fullgraph=True)   # the op mutates under tracing
    assert torch.equal(step(x, compiled_state, weight), causal_conv1d_step(x, eager_state, weight))
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
    out = causal_conv1d_silu(x_dev, weight_dev, ids_dev, split_sizes)
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
    compiled = torch.compile(causal_conv1d_silu, backend="aot_eager", fullgraph=True)   # no graph break
    for fn in (causal_conv1d_silu, compiled):
        x_grad, weight_grad = x.to(DEVICE).requires_grad_(), weight.to(DEVICE).requires_grad_()
        fn(x_grad, weight_grad, ids.to(DEVICE)).sum().backward()
        if fn is causal_conv1d_silu:
            expected = x_grad.grad, weight_grad.grad
    assert torch.equal(x_grad.grad, expected[0]) and torch.equal(weight_grad.grad, expected[1])
    with pytest.raises(ValueError, match="weight"):
        causal_conv1d_silu(x, weight[:4])
    with pytest.raises(ValueError, match="sequence_ids"):
        causal_conv1d_silu(x, weight, ids[:, :8])
    for split_sizes in ([2, 2], [1, 1, 1, 2], [5, 0]):
        with pytest.raises(ValueError, match="split_sizes"):
            causal_conv1d_silu(x, weight, None, split_sizes)


def gated_norm_inputs(dtype, residual: bool, generator) -> dict:
    """Fresh inputs of odd sizes: 2 × 9 tokens, N = 3 heads of V = 7 (21 values in a block of 32); D and the
    norm weight away from their initial ones."""
    shape = (2, 9, 3, 7)
    tensors = dict(y=torch.randn(*shape, generator=generator).to(dtype), g=torch.randn(*shape, generator=generator).to(dtype),
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
    reference = gated_rms_norm_torch(eps=1e-6, **leaves64)
    reference_grads = torch.autograd.grad(reference, list(leaves64.values()), dout)

    leaves = {name: x.to(DEVICE).requires_grad_() for name, x in tensors.items()}
    out = gated_rms_norm(eps=1e-6, **leaves)
    grads = torch.autograd.grad(out, list(leaves.values()), dout.to(DEVICE, out.dtype))
    assert out.dtype == torch.float32 and out.shape == (2, 9, 21)   # float32 weight and D promote
    with torch.no_grad():   # inference launches the kernel without the op
        assert torch.equal(gated_rms_norm(eps=1e-6, **leaves), out)
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
    assert torch.equal(compiled(eps=1e-5, **tensors), gated_rms_norm(eps=1e-5, **tensors))
    y, v, D = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), torch.randn(3, 4)
    for bad in (dict(g=y[..., :3], weight=torch.ones(12)), dict(g=y, weight=torch.ones(11)),
                dict(g=y, weight=torch.ones(12), v=v), dict(g=y, weight=torch.ones(12), v=v, D=D[:2])):
        with pytest.raises(ValueError, match="gated_rms_norm: expected"):
            gated_rms_norm(y, eps=1e-5, **bad)
