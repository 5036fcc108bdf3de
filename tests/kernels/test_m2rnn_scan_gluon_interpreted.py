"""The Gluon scan kernels' logic against the float64 reference on the CPU: read as Triton (gluon_interpreter) and
launched by triton_scan wherever they would run on a GPU, through m2rnn_scan, forward and backward. What this cannot
check (what the layouts do on the GPU, tanh.approx, bf16 products on the tensor cores) benchmarks/check_scan_gpu.py
checks on the GPU. Error measure and bounds: helpers.BOUND."""

from collections import Counter

import pytest
import torch

from modeling_m2rnn.kernels import m2rnn_scan_reference
from modeling_m2rnn.kernels.m2rnn_scan import triton_scan
from modeling_m2rnn.kernels.m2rnn_scan.triton_scan import KernelConfig

from gluon_interpreter import interpreted
from helpers import BOUND, DEVICE, relative_error
from scan_checks import check_against_reference, make_inputs

GLUON_KERNELS = ("scan_forward_gluon_kernel", "scan_backward_gluon_kernel")


class _Counted:
    """A kernel whose launches (kernel[grid](...)) are counted under `name`."""

    def __init__(self, kernel, launches: Counter, name: str):
        self.kernel, self.launches, self.name = kernel, launches, name

    def __getitem__(self, grid):
        self.launches[self.name] += 1
        return self.kernel[grid]


def use_gluon(monkeypatch, kernels=("forward", "backward")) -> Counter:
    """The Gluon `kernels`, interpreted, in place of their twins wherever a GPU where they are checked would run them;
    returns their launches, counted, so that a test shows they ran."""
    launches = Counter()
    for name in GLUON_KERNELS:
        monkeypatch.setattr(triton_scan, name, _Counted(interpreted(getattr(triton_scan, name)), launches, name))
    monkeypatch.setattr(triton_scan, "gluon_kernel_enabled", lambda kernel, device: kernel in kernels)
    return launches


@pytest.fixture
def gluon_launches(monkeypatch) -> Counter:
    return use_gluon(monkeypatch)


CASES = {
    # name: (B, S, K, V, (Nq, Nk, Nv, Nf, Nw), dtype, initial state, gradient clipping)
    # K and V short of their blocks (masked rows and columns), shared q and k, W shared by pairs of heads.
    "bf16_odd_dims_clip": (2, 7, 48, 12, (1, 1, 4, 4, 2), torch.bfloat16, True, 0.3),
    # 16-row blocks (K = 16), past a checkpoint chunk (S > 32), no initial state.
    "fp16_two_chunks": (1, 37, 16, 16, (2, 2, 2, 2, 2), torch.float16, False, None),
    # Three row blocks, the last part-filled; V = 20 in a 32-column block.
    "bf16_K72_V20": (1, 5, 72, 20, (1, 1, 2, 2, 2), torch.bfloat16, True, 1.0),
}


@pytest.mark.parametrize("case", CASES)
def test_gluon_kernels_match_reference(case, gluon_launches):
    B, S, K, V, counts, dtype, with_state, clip = CASES[case]
    check_against_reference(make_inputs(B, S, K, V, counts, dtype, with_state), gradient_clipping=clip)
    assert gluon_launches == {name: 1 for name in GLUON_KERNELS}


def test_gluon_kernels_match_reference_packed_across_chunks_and_segments(gluon_launches, monkeypatch):
    """Packed sequences in 4-step chunks, the backward one chunk per launch: sequences start and end mid-chunk and
    cross checkpoint and segment bounds."""
    monkeypatch.setattr(triton_scan, "CONFIG", KernelConfig(chunk=4, backward_partials_mib=0))
    cu_seqlens = torch.tensor([0, 1, 6, 7, 7, 15], device=DEVICE)  # lengths 1, 5, 1, 0, 8
    inputs = make_inputs(1, 15, 24, 6, (1, 1, 2, 2, 2), torch.bfloat16, True, num_states=5)
    check_against_reference(inputs, gradient_clipping=0.3, cu_seqlens=cu_seqlens)
    assert gluon_launches == {"scan_forward_gluon_kernel": 1, "scan_backward_gluon_kernel": 4}  # 15 steps: 4 chunks


@pytest.mark.parametrize("kernel", ["backward", "forward"])
def test_one_gluon_kernel_beside_the_other_twin(kernel, monkeypatch):
    """Each reads the checkpoints the other writes: the Gluon backward after the Triton forward (what runs where only
    the backward is checked) and the reverse, on packed sequences across chunks."""
    launches = use_gluon(monkeypatch, kernels=(kernel,))
    monkeypatch.setattr(triton_scan, "CONFIG", KernelConfig(chunk=4))
    cu_seqlens = torch.tensor([0, 3, 13, 14], device=DEVICE)
    inputs = make_inputs(1, 14, 40, 12, (1, 1, 2, 2, 2), torch.bfloat16, True, num_states=3)
    check_against_reference(inputs, gradient_clipping=0.5, cu_seqlens=cu_seqlens)
    assert launches == {f"scan_{kernel}_gluon_kernel": 1}


def test_gluon_inference_forward_matches_reference(gluon_launches):
    """No gradient: the forward without checkpoints."""
    q, k, v, W, f, h0 = make_inputs(3, 6, 40, 10, (1, 1, 4, 4, 4), torch.bfloat16, True)
    with torch.no_grad():
        y, final_state, checkpoints = triton_scan.scan_op(q, k, v, W, f, h0, None, None, False)
    ref_y, ref_final = m2rnn_scan_reference(*(x.double() for x in (q, k, v, W, f, h0)))
    assert checkpoints.numel() == 0 and gluon_launches == {"scan_forward_gluon_kernel": 1}
    assert relative_error(y, ref_y) < BOUND[torch.bfloat16]
    assert relative_error(final_state, ref_final) < BOUND[torch.bfloat16]


def test_gluon_kernels_match_reference_with_64_row_blocks(gluon_launches, monkeypatch):
    """Forward and backward programs of 64 rows (at K = 64 one per head, with no y, dv or df partials across row
    blocks); here K = 72 in two blocks, the second mostly padding."""
    monkeypatch.setattr(triton_scan, "CONFIG", KernelConfig(forward_rows=64, backward_rows=64))
    check_against_reference(make_inputs(1, 37, 72, 20, (1, 1, 2, 2, 2), torch.float16, True))
    assert gluon_launches == {name: 1 for name in GLUON_KERNELS}
