"""One decode step of the depthwise causal convolution and its SiLU, with the cached window updated in place.

    out = silu(Σ_j weight[:, j] · window[:, j]),   window = (conv_state[:, :, 1:], x)   per channel
    conv_state ← window

x (B, C) is the new input, conv_state (B, C, k) the last k inputs (oldest first) and weight (C, k). This is
what the short convolution in front of the recurrence computes for one token (naive.causal_conv1d): done by
PyTorch (naive.causal_conv1d_step_reference) it is a copy of the window, a product, a sum and the SiLU, several
kernels per layer and token, here one. The op mutates `conv_state` and so captures in a CUDA graph with a static cache.
"""

import torch
import triton
import triton.language as tl

from ..backend import launches_directly

_CHANNELS_PER_PROGRAM = 128


@triton.jit
def conv_step_kernel(
    x_ptr, state_ptr, weight_ptr, out_ptr,
    channels, x_batch_stride, state_batch_stride, state_channel_stride,
    KERNEL_SIZE: tl.constexpr, BLOCK_TAPS: tl.constexpr, BLOCK_CHANNELS: tl.constexpr,
):
    batch = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_CHANNELS + tl.arange(0, BLOCK_CHANNELS)  # (BC,)
    tap = tl.arange(0, BLOCK_TAPS)  # (BT,)
    in_channels = c < channels
    state = state_ptr + batch.to(tl.int64) * state_batch_stride + c[:, None] * state_channel_stride

    # The window is the cached inputs 1..k-1 followed by x.
    older = tl.load(state + tap[None, :] + 1, mask=in_channels[:, None] & (tap[None, :] < KERNEL_SIZE - 1), other=0.0)
    x = tl.load(x_ptr + batch.to(tl.int64) * x_batch_stride + c, mask=in_channels, other=0.0)
    window = tl.where(tap[None, :] == KERNEL_SIZE - 1, x[:, None], older)  # (BC, BT)
    weight = tl.load(weight_ptr + c[:, None] * KERNEL_SIZE + tap[None, :],
                     mask=in_channels[:, None] & (tap[None, :] < KERNEL_SIZE), other=0.0)
    conv = tl.sum(window.to(tl.float32) * weight.to(tl.float32), axis=1)
    out = conv / (1.0 + tl.exp(-conv))
    tl.store(out_ptr + batch.to(tl.int64) * channels + c, out.to(out_ptr.dtype.element_ty), mask=in_channels)

    # Every load of the window must be done before any thread overwrites the inputs it reads.
    tl.debug_barrier()
    taps = in_channels[:, None] & (tap[None, :] < KERNEL_SIZE)
    tl.store(state + tap[None, :], window.to(state_ptr.dtype.element_ty), mask=taps)


def _conv_step(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    batch, channels = x.shape
    kernel_size = weight.shape[1]
    if x.stride(1) != 1 or conv_state.stride(2) != 1:
        raise ValueError("causal_conv1d_step: `x` and `conv_state` must be contiguous along channels / taps")
    out = torch.empty(batch, channels, device=x.device, dtype=x.dtype)
    conv_step_kernel[(batch, triton.cdiv(channels, _CHANNELS_PER_PROGRAM))](
        x, conv_state, weight.contiguous(), out,
        channels, x.stride(0), conv_state.stride(0), conv_state.stride(1),
        KERNEL_SIZE=kernel_size, BLOCK_TAPS=triton.next_power_of_2(kernel_size),
        BLOCK_CHANNELS=_CHANNELS_PER_PROGRAM, num_warps=4,
    )
    return out


@torch.library.custom_op("m2rnn::conv_step", mutates_args=("conv_state",))
def conv_step_op(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return _conv_step(x, conv_state, weight)


@conv_step_op.register_fake
def _(x, conv_state, weight):
    return x.new_empty(x.shape)


def causal_conv1d_step_triton(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """See the module doc. x (B, C); conv_state (B, C, k), updated in place; weight (C, k). Returns (B, C).
    The kernel has no backward: callers take it only where no gradient is needed."""
    if launches_directly(x, conv_state, weight):
        return _conv_step(x, conv_state, weight)
    return conv_step_op(x, conv_state, weight)
