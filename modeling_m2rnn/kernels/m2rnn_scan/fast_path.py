"""Where the scan's GPU-only kernels (gluon_forward.py, gluon_backward.py) run instead of their plain-Triton twins.

A Gluon kernel runs only where it has been checked against the float64 reference on the GPU
(benchmarks/check_scan_gpu.py) and timed faster than its twin: on the compute capabilities and Triton versions listed
for it in CHECKED. Everywhere else (the CPU and its Triton interpreter, other GPUs, other Triton versions) its Triton
twin runs. The CPU test suite runs the twins and, read as Triton, the Gluon kernels' logic. The choice is made before
a launch, from the device and the installed Triton, never by catching a failure.

The environment variable M2RNN_SCAN_KERNELS overrides the choice, read at each call:
  auto    (default) each Gluon kernel where it is checked
  triton  the Triton twins everywhere
  gluon   the Gluon kernels on every GPU that can run them (compute capability 8.0 or newer), checked or not:
          for running benchmarks/check_scan_gpu.py on a new GPU or Triton version, or on a new kernel
"""

import os

import torch
import triton

ENVIRONMENT_VARIABLE = "M2RNN_SCAN_KERNELS"
CHOICES = ("auto", "triton", "gluon")
# Per kernel, the (compute capability, Triton major.minor) pairs on which benchmarks/check_scan_gpu.py passed and the
# kernel ran faster than its twin (benchmarks/RESULTS.md). The forward passed the check on the H100 but ran slower: it
# runs only under M2RNN_SCAN_KERNELS=gluon.
CHECKED = {
    "forward": (),
    "backward": (((9, 0), "3.6"),),  # H100
}
# The Gluon kernels' tensor-core products (mma_v2) need compute capability 8.0.
MINIMUM_CAPABILITY = (8, 0)


def kernel_choice() -> str:
    """The value of M2RNN_SCAN_KERNELS, checked."""
    choice = os.environ.get(ENVIRONMENT_VARIABLE, "auto")
    if choice not in CHOICES:
        raise ValueError(f"{ENVIRONMENT_VARIABLE}={choice!r}: expected one of {', '.join(CHOICES)}")
    return choice


def gluon_kernel_enabled(kernel: str, device: torch.device) -> bool:
    """Whether the Gluon `kernel` ("forward" or "backward") runs on `device` (see the module doc)."""
    if kernel not in CHECKED:
        raise ValueError(f"kernel={kernel!r}: expected one of {', '.join(CHECKED)}")
    choice = kernel_choice()
    if choice == "triton" or device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    capability = torch.cuda.get_device_capability(device)
    if choice == "gluon":
        return capability >= MINIMUM_CAPABILITY
    triton_version = ".".join(triton.__version__.split(".")[:2])
    return (tuple(capability), triton_version) in CHECKED[kernel]


def gluon_kernels(device: torch.device) -> dict:
    """{kernel: "gluon" or "triton"}: which kernel of each pair runs on `device` (benchmarks record it)."""
    return {kernel: "gluon" if gluon_kernel_enabled(kernel, device) else "triton" for kernel in CHECKED}
