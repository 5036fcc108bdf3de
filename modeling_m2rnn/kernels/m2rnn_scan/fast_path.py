"""Where the scan's GPU-only kernel (the Gluon backward, gluon_backward.py) runs instead of its plain-Triton twin.

A Gluon kernel runs only where it has been checked against the float64 reference on the GPU
(benchmarks/check_scan_gpu.py): on the compute capabilities and Triton versions listed here. Everywhere else
(the CPU and its Triton interpreter, other GPUs, other Triton versions) the Triton twins run, and they are what the
CPU test suite checks. The choice is made before a launch, from the device and the installed Triton, never by
catching a failure.

The environment variable M2RNN_SCAN_KERNELS overrides the choice, read at each call:
  auto    (default) the Gluon kernels where they are checked
  triton  the Triton twins everywhere
  gluon   the Gluon kernels on every GPU that can run them (compute capability 8.0 or newer), checked or not:
          for running benchmarks/check_scan_gpu.py on a new GPU or Triton version
"""

import os

import torch
import triton

ENVIRONMENT_VARIABLE = "M2RNN_SCAN_KERNELS"
CHOICES = ("auto", "triton", "gluon")
# Checked by benchmarks/check_scan_gpu.py (results on benchmarks/RESULTS.md): H100, Triton 3.6.
CHECKED_CAPABILITIES = ((9, 0),)
CHECKED_TRITON_VERSIONS = ("3.6",)
# The Gluon kernels' tensor-core products (mma_v2) need compute capability 8.0.
MINIMUM_CAPABILITY = (8, 0)


def kernel_choice() -> str:
    """The value of M2RNN_SCAN_KERNELS, checked."""
    choice = os.environ.get(ENVIRONMENT_VARIABLE, "auto")
    if choice not in CHOICES:
        raise ValueError(f"{ENVIRONMENT_VARIABLE}={choice!r}: expected one of {', '.join(CHOICES)}")
    return choice


def gluon_kernels_enabled(device: torch.device) -> bool:
    """Whether the Gluon kernels run on `device` (see the module doc)."""
    choice = kernel_choice()
    if choice == "triton" or device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    capability = torch.cuda.get_device_capability(device)
    if choice == "gluon":
        return capability >= MINIMUM_CAPABILITY
    triton_version = ".".join(triton.__version__.split(".")[:2])
    return capability in CHECKED_CAPABILITIES and triton_version in CHECKED_TRITON_VERSIONS
