"""The gated delta rule on fla-core's Triton kernels (`pip install m2rnn[fla]`), CUDA only: the chunked kernel for
training and prefill, the fused recurrent one (no backward) for a few tokens without gradients."""

import functools
import importlib.util
import os

import torch

from ..backend import needs_grad

# lm-engine's switch between the two kernels: up to this many tokens without gradients, the fused recurrent one.
FUSED_RECURRENT_MAX_TOKENS = 64


# Looked up once, without importing fla (its import queries the GPU and takes seconds); a constant, so that a compiled
# graph can read it (dynamo refuses to trace importlib's find_spec).
FLA_FOUND = importlib.util.find_spec("fla") is not None


def fla_is_available() -> bool:
    """Whether fla-core is installed."""
    return FLA_FOUND


@functools.cache
def fla_backward_refusal(device: torch.device) -> str | None:
    """Why fla's chunked backward refuses to run on `device`, or None. Triton from 3.4.0 up to 3.7.1 miscompiles its
    gated `chunk_bwd_dqkwg` kernel on Hopper (wrong dk, db, dg: fla issue #640, fixed in Triton 3.7.1), and fla then
    raises in the backward unless its TileLang backend takes that kernel over."""
    import triton
    from packaging.version import Version

    hopper = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9
    affected = Version("3.4.0") <= Version(triton.__version__) < Version("3.7.1")
    if not (hopper and affected) or fla_tilelang_is_usable():
        return None
    return (f"fla's gated delta rule backward refuses Triton {triton.__version__} on Hopper (fla issue #640); "
            "Triton >= 3.7.1, or the `tilelang` package with CUDA's nvcc (and FLA_TILELANG unset or 1), lifts it")


def fla_tilelang_is_usable() -> bool:
    """Whether fla hands the kernel to its TileLang backend, by fla's own tests: the `tilelang` package, an nvcc that
    TileLang can compile with, and the backend not switched off (FLA_TILELANG=0)."""
    if os.environ.get("FLA_TILELANG", "1") == "0" or importlib.util.find_spec("tilelang") is None:
        return False
    from fla.utils.env import has_usable_nvcc

    return has_usable_nvcc()


def gated_delta_rule_fla(q, k, v, g, beta, scale: float, initial_state=None, cu_seqlens=None, qk_l2norm=False):
    """`kernels.gated_delta_rule` on fla's kernels; inputs are assumed validated. fla takes the same layout, log
    decay, state (N, H, K, V) and `cu_seqlens` convention, and l2-normalises q and k inside its kernels."""
    try:   # (in a try block, transformers' check of a remote-code checkpoint's imports does not require fla)
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
    except ImportError as error:
        raise ImportError("gated_delta_rule: fla's kernels need fla-core (`pip install m2rnn[fla]`)") from error

    use_chunks = needs_grad(q, k, v, g, beta, initial_state) or q.shape[1] > FUSED_RECURRENT_MAX_TOKENS
    kernel = chunk_gated_delta_rule if use_chunks else fused_recurrent_gated_delta_rule
    o, final_state = kernel(
        q=q,
        k=k,
        v=v,
        g=g,
        beta=beta,
        scale=scale,
        initial_state=initial_state,
        output_final_state=True,
        use_qk_l2norm_in_kernel=qk_l2norm,
        cu_seqlens=None if cu_seqlens is None else cu_seqlens.long(),   # fla indexes with int64 bounds
    )
    return o.to(v.dtype), final_state
