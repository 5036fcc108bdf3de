"""The Gluon backward scan kernel and the choice between it and its Triton twin, on a machine without a GPU.

The Gluon kernel cannot run here (the Triton interpreter does not run Gluon); benchmarks/check_scan_gpu.py checks it
against the float64 reference on the GPU. Here: it compiles for Hopper with the installed Triton, with nothing in
shared memory, and the dispatch chooses it only where fast_path says it is checked."""

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
from modeling_m2rnn.kernels.m2rnn_scan.triton_scan import ScanShape

BACKWARD_ARGUMENTS = dict(q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", W_ptr="*fp32", f_ptr="*fp32",
                          cu_seqlens_ptr="*i64", checkpoint_ptr="*fp16", dy_ptr="*bf16", dstate_ptr="*fp32",
                          dq_ptr="*bf16", dk_ptr="*bf16", dv_ptr="*bf16", df_ptr="*fp32", dW_ptr="*fp32",
                          scratch_ptr="*fp16", seq_len="i32", num_slots="i32", clip="fp32", segment_start="i32",
                          segment_end="i32", segment_steps="i32", row_block_steps="i32")


def compile_for_hopper(K: int, V: int, varlen: bool) -> dict:
    """Compiles the Gluon backward for compute capability 9.0 (in a process without the Triton interpreter, whose
    functions a Gluon kernel cannot call): its shared memory and SASS."""
    fn = scan_backward_gluon_kernel
    block_k, block_v = max(16, triton.next_power_of_2(K)), max(16, triton.next_power_of_2(V))
    constants = dict(N=6, NQ=1, NK=2, NV=6, NF=6, NW=3, K=K, V=V, BK=block_k, BV=block_v, HP=1, BR=32, CHUNK=32,
                     VARLEN=varlen, CLIP=True, DOT_DTYPE=tl.float16, DOT_PRECISION="ieee", GRAD_DTYPE=tl.bfloat16,
                     GRAD_PRECISION="ieee", FAST_TANH=True, LANE_SUMS=True, PREFETCH=True)
    signature = dict(BACKWARD_ARGUMENTS, **{constant: "constexpr" for constant in constants})
    constexprs = {(fn.arg_names.index(n),): c for n, c in constants.items()}
    kernel = triton.compile(GluonASTSource(fn, signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=1))
    return {"shared": kernel.metadata.shared, "sass": kernel.asm["sass"]}


@pytest.mark.parametrize("K, V, varlen", [(64, 16, False), (72, 20, True)])
def test_gluon_backward_compiles_for_hopper_without_shared_memory(K, V, varlen):
    """The kernel, loops included, keeps its operands in registers: no shared memory is allocated, and the 8×8 tiles
    are transposed by movmatrix."""
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    environment["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[2]), environment.get("PYTHONPATH", "")])
    code = f"import json, {Path(__file__).stem} as t; print(json.dumps(t.compile_for_hopper({K}, {V}, {varlen})))"
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
    """A CUDA device of a given compute capability, as seen by fast_path, where the Gluon kernels are checked on
    compute capability 9.0 and Triton 3.6."""

    def __init__(self, monkeypatch, capability, triton_version="3.6.0"):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(triton, "__version__", triton_version)
        monkeypatch.setattr(fast_path, "CHECKED_CAPABILITIES", ((9, 0),))
        monkeypatch.setattr(fast_path, "CHECKED_TRITON_VERSIONS", ("3.6",))
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        self.device = torch.device("cuda", 0)


@pytest.mark.parametrize("capability, triton_version, choice, expected", [
    ((9, 0), "3.6.0", "auto", True),     # checked
    ((9, 0), "3.6.0", "triton", False),  # forced twin
    ((9, 0), "3.9.0", "auto", False),    # unchecked Triton
    ((8, 0), "3.6.0", "auto", False),    # unchecked GPU
    ((8, 0), "3.9.0", "gluon", True),    # forced where it can run
    ((7, 5), "3.6.0", "gluon", False),   # no mma_v2 before compute capability 8.0
])
def test_gluon_kernels_run_where_checked(monkeypatch, capability, triton_version, choice, expected):
    cuda = FakeCuda(monkeypatch, capability, triton_version)
    monkeypatch.setenv(fast_path.ENVIRONMENT_VARIABLE, choice)
    assert fast_path.gluon_kernels_enabled(cuda.device) is expected


def test_dispatch(monkeypatch):
    """On a checked GPU the Gluon kernels take 16-bit sequences on one-head, one-warp programs; float32, decode steps,
    other launch settings and the CPU keep the twins."""
    gpu = FakeCuda(monkeypatch, (9, 0)).device
    runs_gluon = triton_scan._runs_gluon
    assert runs_gluon(shape(), torch.bfloat16, gpu, heads=1, warps=1)
    assert runs_gluon(shape(), torch.float16, gpu, heads=1, warps=1)
    assert not runs_gluon(shape(seq_len=1), torch.bfloat16, gpu, heads=1, warps=1)
    assert not runs_gluon(shape(), torch.bfloat16, gpu, heads=2, warps=1)
    assert not runs_gluon(shape(), torch.bfloat16, gpu, heads=1, warps=2)
    assert not runs_gluon(shape(), torch.float32, gpu, heads=1, warps=1)
    assert not runs_gluon(shape(), torch.bfloat16, torch.device("cpu"), heads=1, warps=1)


def test_unknown_choice_is_an_error(monkeypatch):
    monkeypatch.setenv(fast_path.ENVIRONMENT_VARIABLE, "fast")
    with pytest.raises(ValueError, match="M2RNN_SCAN_KERNELS='fast': expected one of auto, triton, gluon"):
        fast_path.gluon_kernels_enabled(torch.device("cpu"))
