"""The Triton scan kernels against the float64 PyTorch reference, through the Triton interpreter on a machine
without CUDA (so the shapes are tiny). Error measure and bounds: helpers.BOUND."""

import pytest
import torch

from modeling_m2rnn.kernels import m2rnn_scan, m2rnn_scan_reference
from modeling_m2rnn.kernels.m2rnn_scan import triton_scan
from modeling_m2rnn.kernels.m2rnn_scan.triton_scan import KernelConfig

from helpers import BOUND, DEVICE, relative_error
from scan_checks import check_against_reference, make_inputs, run_with_grads


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
    grads = {clip_value: run_with_grads(m2rnn_scan_reference, inputs, output_grads, gradient_clipping=clip_value)[2]
             for clip_value in (clip, None)}
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
