"""Which implementation of an op runs: the backends, and the one rule every op applies to choose among them."""

import os

import torch

BACKENDS = ("auto", "torch", "triton")


def triton_is_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def uses_triton(backend: str, x: torch.Tensor) -> bool:
    """Whether `backend` runs the Triton kernels for tensors like `x`: "triton" always, "auto" on CUDA, and never
    for float64, which keeps the PyTorch reference (the kernels compute in float32, a float64 check would measure
    their rounding)."""
    if backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton" and not triton_is_available():
        raise ValueError("backend='triton' needs the `triton` package")
    if backend == "triton" and not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        # (Triton itself would fail with "0 active drivers"; the interpreter reads the variable when Triton is
        # imported, so it must be set before that)
        raise ValueError(f"backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 to interpret the kernels; got "
                         f"tensors on {x.device}")
    if x.dtype == torch.float64:
        return False
    if backend == "auto":
        return x.is_cuda and triton_is_available()
    return backend == "triton"


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd will ask for a gradient of any of `tensors`."""
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in tensors)


def launches_directly(*tensors: torch.Tensor | None) -> bool:
    """Eager inference and decoding launch a kernel without the torch library op around it: there the op dispatcher
    would only add host time to a short kernel. Under torch.compile, or where a gradient is needed, the op runs."""
    return not torch.compiler.is_compiling() and not needs_grad(*tensors)
