"""The Gluon scan kernels and the choice between them and their Triton twins, on a machine without a GPU.

The kernels themselves cannot run here (the Triton interpreter does not run Gluon; test_m2rnn_scan_gluon_interpreted.py
runs their logic read as Triton); benchmarks/check_scan_gpu.py checks them against the float64 reference on the GPU.
Here: they compile for Hopper with the installed Triton, with nothing in shared memory, and the dispatch chooses them
only where fast_path says they are checked."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource

from modeling_m2rnn.kernels.m2rnn_scan import fast_path, triton_scan
from modeling_m2rnn.kernels.m2rnn_scan.gluon_backward import scan_backward_gluon_kernel
from modeling_m2rnn.kernels.m2rnn_scan.gluon_forward import scan_forward_gluon_kernel
from modeling_m2rnn.kernels.m2rnn_scan.triton_scan import ScanShape

FORWARD_ARGUMENTS = dict(q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", W_ptr="*fp32", f_ptr="*fp32", h0_ptr="*fp32",
                         cu_seqlens_ptr="*i64", y_ptr="*bf16", h_final_ptr="*fp32", checkpoint_ptr="*fp16",
                         seq_len="i32", num_slots="i32", y_partial_stride="i32")
BACKWARD_ARGUMENTS = dict(q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", W_ptr="*fp32", f_ptr="*fp32",
                          cu_seqlens_ptr="*i64", checkpoint_ptr="*fp16", dy_ptr="*bf16", dstate_ptr="*fp32",
                          dq_ptr="*bf16", dk_ptr="*bf16", dv_ptr="*bf16", df_ptr="*fp32", dW_ptr="*fp32",
                          scratch_ptr="*fp16", seq_len="i32", num_slots="i32", clip="fp32", segment_start="i32",
                          segment_end="i32", segment_steps="i32", row_block_steps="i32")


def compile_for_hopper(direction: str, K: int, V: int, varlen: bool) -> dict:
    """Compiles the Gluon forward or backward for compute capability 9.0 (in a process without the Triton interpreter,
    whose functions a Gluon kernel cannot call): its shared memory and SASS."""
    block_k, block_v = max(16, triton.next_power_of_2(K)), max(16, triton.next_power_of_2(V))
    constants = dict(N=6, NQ=1, NK=2, NV=6, NF=6, NW=3, K=K, V=V, BK=block_k, BV=block_v, HP=1, BR=32, CHUNK=32,
                     VARLEN=varlen, DOT_DTYPE=tl.float16, DOT_PRECISION="ieee", FAST_TANH=True, LANE_SUMS=True,
                     PREFETCH=True)
    if direction == "forward":
        fn, arguments = scan_forward_gluon_kernel, FORWARD_ARGUMENTS
        constants.update(HAS_H0=not varlen, STORE_CHECKPOINTS=True)
    else:
        fn, arguments = scan_backward_gluon_kernel, BACKWARD_ARGUMENTS
        constants.update(CLIP=True, GRAD_DTYPE=tl.bfloat16, GRAD_PRECISION="ieee")
    signature = dict(arguments, **{constant: "constexpr" for constant in constants})
    constexprs = {(fn.arg_names.index(n),): c for n, c in constants.items()}
    kernel = triton.compile(GluonASTSource(fn, signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=1))
    return {"shared": kernel.metadata.shared, "sass": kernel.asm["sass"]}


@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("K, V, varlen", [(64, 16, False), (72, 20, True)])
def test_gluon_kernels_compile_for_hopper_without_shared_memory(direction, K, V, varlen):
    """The kernels, loops included, keep their operands in registers: no shared memory is allocated, and the 8×8 tiles
    are transposed by movmatrix."""
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    environment["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[2]), environment.get("PYTHONPATH", "")])
    code = (f"import json, {Path(__file__).stem} as t; "
            f"print(json.dumps(t.compile_for_hopper({direction!r}, {K}, {V}, {varlen})))")
    done = subprocess.run([sys.executable, "-c", code], env=environment, cwd=Path(__file__).parent,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    compiled = json.loads(done.stdout.strip().splitlines()[-1])
    assert compiled["shared"] == 0
    assert all(instruction in compiled["sass"] for instruction in ("HMMA", "MUFU.TANH", "MOVM"))


def shape(seq_len=64):
    return ScanShape(batch=2, seq_len=seq_len, num_heads=4, nq=1, nk=1, nv=4, nf=4, nw=4, key_dim=64, value_dim=16,
                     num_states=2, varlen=False)


class FakeCuda:
    """A CUDA device of a given compute capability, as seen by fast_path, where the Gluon backward is checked on
    compute capability 9.0 and Triton 3.6 and the Gluon forward nowhere."""

    def __init__(self, monkeypatch, capability, triton_version="3.6.0"):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(triton, "__version__", triton_version)
        monkeypatch.setattr(fast_path, "CHECKED", {"forward": (), "backward": (((9, 0), "3.6"),)})
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        self.device = torch.device("cuda", 0)


@pytest.mark.parametrize("kernel, capability, triton_version, choice, expected", [
    ("backward", (9, 0), "3.6.0", "auto", True),     # checked
    ("forward", (9, 0), "3.6.0", "auto", False),     # listed nowhere
    ("backward", (9, 0), "3.6.0", "triton", False),  # forced twin
    ("backward", (9, 0), "3.9.0", "auto", False),    # unchecked Triton
    ("backward", (8, 0), "3.6.0", "auto", False),    # unchecked GPU
    ("backward", (8, 0), "3.9.0", "gluon", True),    # forced where it can run
    ("forward", (9, 0), "3.6.0", "gluon", True),     # forced, to be checked
    ("forward", (7, 5), "3.6.0", "gluon", False),    # no mma_v2 before compute capability 8.0
])
def test_gluon_kernels_run_where_checked(monkeypatch, kernel, capability, triton_version, choice, expected):
    cuda = FakeCuda(monkeypatch, capability, triton_version)
    monkeypatch.setenv(fast_path.ENVIRONMENT_VARIABLE, choice)
    assert fast_path.gluon_kernel_enabled(kernel, cuda.device) is expected
    assert fast_path.gluon_kernels(cuda.device)[kernel] == ("gluon" if expected else "triton")


@pytest.mark.parametrize("kernel", ["forward", "backward"])
def test_dispatch(monkeypatch, kernel):
    """On a GPU where a Gluon kernel runs, it takes 16-bit sequences on one-head, one-warp programs; float32, decode
    steps, other launch settings and the CPU keep the twins."""
    gpu = FakeCuda(monkeypatch, (9, 0)).device
    monkeypatch.setenv(fast_path.ENVIRONMENT_VARIABLE, "gluon")

    def runs_gluon(shape, dtype, device, heads=1, warps=1):
        return triton_scan._runs_gluon(kernel, shape, dtype, device, heads, warps)

    assert runs_gluon(shape(), torch.bfloat16, gpu)
    assert runs_gluon(shape(), torch.float16, gpu)
    assert not runs_gluon(shape(seq_len=1), torch.bfloat16, gpu)
    assert not runs_gluon(shape(), torch.bfloat16, gpu, heads=2)
    assert not runs_gluon(shape(), torch.bfloat16, gpu, warps=2)
    assert not runs_gluon(shape(), torch.float32, gpu)
    assert not runs_gluon(shape(), torch.bfloat16, torch.device("cpu"))


def test_unknown_kernel_is_an_error():
    with pytest.raises(ValueError, match="kernel='decode': expected one of forward, backward"):
        fast_path.gluon_kernel_enabled("decode", torch.device("cpu"))


def test_unknown_choice_is_an_error(monkeypatch):
    monkeypatch.setenv(fast_path.ENVIRONMENT_VARIABLE, "fast")
    with pytest.raises(ValueError, match="M2RNN_SCAN_KERNELS='fast': expected one of auto, triton, gluon"):
        fast_path.gluon_kernel_enabled("backward", torch.device("cpu"))
