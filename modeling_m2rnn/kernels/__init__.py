"""The ops of the M2RNN layer, each with a PyTorch reference beside its Triton kernels and one entry point that takes
the backend and chooses (docs/design.md, "Kernel contracts"): the recurrence (`m2rnn_scan`), the short convolution
in front of it (`causal_conv1d_silu`, and `causal_conv1d_step` for one decode step) and the gated norm behind it
(`gated_rms_norm`); and Gated DeltaNet's recurrence (`gated_delta_rule`: a PyTorch reference beside fla-core's
kernels). This package knows nothing of transformers: it takes tensors and returns tensors."""

from .backend import BACKENDS, triton_is_available, uses_triton
from .gated_delta_rule import GDN_BACKENDS, gated_delta_rule, gated_delta_rule_reference
from .gated_norm import gated_rms_norm, gated_rms_norm_reference, rms_norm
from .m2rnn_scan import m2rnn_scan, m2rnn_scan_reference
from .short_conv import causal_conv1d, causal_conv1d_silu, causal_conv1d_step, causal_conv1d_step_reference

__all__ = [
    "BACKENDS",
    "GDN_BACKENDS",
    "causal_conv1d",
    "causal_conv1d_silu",
    "causal_conv1d_step",
    "causal_conv1d_step_reference",
    "gated_delta_rule",
    "gated_delta_rule_reference",
    "gated_rms_norm",
    "gated_rms_norm_reference",
    "m2rnn_scan",
    "m2rnn_scan_reference",
    "rms_norm",
    "triton_is_available",
    "uses_triton",
]
