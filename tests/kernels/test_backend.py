"""The choices every op makes in one place (kernels/backend.py): which backend runs, the float64 rule, the cases only
the PyTorch reference takes, and when a kernel is launched without its custom op."""

import pytest
import torch

from modeling_m2rnn.kernels import (
    causal_conv1d_silu,
    causal_conv1d_step,
    gated_rms_norm,
    m2rnn_scan,
    triton_is_available,
    uses_triton,
)
from modeling_m2rnn.kernels.backend import launches_directly
from modeling_m2rnn.kernels.gated_norm import triton as gated_norm_triton
from modeling_m2rnn.kernels.m2rnn_scan import triton_scan
from modeling_m2rnn.kernels.short_conv import triton_decode_step, triton_whole_sequence

TRITON_ENTRY_POINTS = {
    "scan": (triton_scan, "m2rnn_scan_triton"),
    "conv": (triton_whole_sequence, "short_conv_op"),
    "conv_step": (triton_decode_step, "causal_conv1d_step_triton"),
    "norm": (gated_norm_triton, "gated_rms_norm_triton"),
}


class TritonCalled(Exception):
    pass


@pytest.fixture
def triton_calls(monkeypatch) -> list[str]:
    """The Triton entry points, each replaced by one that records its op and raises."""
    calls = []
    for op, (module, name) in TRITON_ENTRY_POINTS.items():
        def record(*args, op=op, **kwargs):
            calls.append(op)
            raise TritonCalled(op)

        monkeypatch.setattr(module, name, record)
    return calls


def run_every_op(dtype, **overrides) -> None:
    """Each op once on fresh inputs of odd sizes (B=2, S=5, K=3, V=7, one q/k head, two state heads, C=13, k=3)."""
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(2, 5, 1, 3, generator=g, dtype=dtype), torch.randn(2, 5, 1, 3, generator=g, dtype=dtype)
    v, W = torch.randn(2, 5, 2, 7, generator=g, dtype=dtype), torch.randn(2, 7, 7, generator=g, dtype=dtype)
    f = torch.rand(2, 5, 2, generator=g, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    x, weight = torch.randn(2, 5, 13, generator=g, dtype=dtype), torch.randn(13, 3, generator=g, dtype=dtype)
    y, gate = torch.randn(2, 5, 2, 7, generator=g, dtype=dtype), torch.randn(2, 5, 2, 7, generator=g, dtype=dtype)
    conv_state = torch.randn(2, 13, 3, generator=g, dtype=dtype)
    for op in overrides.get("ops", TRITON_ENTRY_POINTS):
        try:
            if op == "scan":
                m2rnn_scan(q, k, v, W, f, backend="triton")
            elif op == "conv":
                causal_conv1d_silu(x, weight, [6, 7], backend="triton", **overrides.get("conv", {}))
            elif op == "conv_step":
                causal_conv1d_step(overrides.get("step_x", x[:, 0]), conv_state, weight, backend="triton")
            else:
                gated_rms_norm(y, overrides.get("gate", gate), torch.ones(14, dtype=dtype), 1e-6, backend="triton")
        except TritonCalled:
            pass


@pytest.mark.skipif(not triton_is_available(), reason="needs triton")
def test_the_triton_backend_runs_every_op_on_triton_except_float64(triton_calls):
    run_every_op(torch.float32)
    assert triton_calls == ["scan", "conv", "conv_step", "norm"]
    triton_calls.clear()
    run_every_op(torch.float64)   # the kernels compute in float32: float64 keeps the exact reference
    assert triton_calls == []


@pytest.mark.skipif(not triton_is_available(), reason="needs triton")
def test_what_the_kernels_do_not_take_runs_the_reference(triton_calls):
    """A conv with a cached context or padding, a conv step that needs a gradient (the kernel has no backward), and a
    gated norm whose g is shared by groups of heads."""
    run_every_op(torch.float32, ops=["conv"], conv=dict(context=torch.randn(2, 13, 7)))
    run_every_op(torch.float32, ops=["conv"], conv=dict(padding_mask=torch.ones(2, 5)))
    run_every_op(torch.float32, ops=["conv_step"], step_x=torch.randn(2, 13, requires_grad=True))
    run_every_op(torch.float32, ops=["norm"], gate=torch.randn(2, 5, 1, 7))
    assert triton_calls == []


def test_auto_is_triton_only_on_cuda_and_a_bad_backend_names_the_argument():
    x = torch.zeros(2)
    assert uses_triton("auto", x) == (x.is_cuda and triton_is_available())
    assert not uses_triton("torch", x)
    with pytest.raises(ValueError, match="`backend` must be one of"):
        uses_triton("cuda", x)


def test_kernels_launch_directly_only_in_eager_mode_without_gradients():
    x = torch.randn(3)
    assert launches_directly(x, None)
    assert not launches_directly(x, torch.randn(3, requires_grad=True))
    with torch.no_grad():
        assert launches_directly(torch.randn(3, requires_grad=True))

    def choose(x):
        return x + 1 if launches_directly(x) else x - 1

    assert torch.equal(torch.compile(choose, backend="eager", fullgraph=True)(x), x - 1)
