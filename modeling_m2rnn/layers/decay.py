"""The decay gate both recurrent mixers share (lm-engine's SoftplusDecayGate): a per-token log decay from a learned
rate A = exp(A_log) and a softplus of the input plus a bias."""

import torch
import torch.nn.functional as F


def softplus_log_decay(a: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
    """a (..., H); A_log, dt_bias (H,) → −exp(A_log)·softplus(a + dt_bias) <= 0, in float32 (in bf16 every decay
    above ~0.998 would round to 1 and freeze its head)."""
    return -torch.exp(A_log.float()) * F.softplus(a.float() + dt_bias.float())
