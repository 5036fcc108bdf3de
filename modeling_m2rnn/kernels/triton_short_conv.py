"""The short convolution of whole sequences and its SiLU on Triton, forward and backward, for training and prefill:

    pre[t, c] = Σ_j weight[c, j] · x[t − (k − 1) + j, c],   out = silu(pre)        per row of x (B, S, C)

A tap before the row's start, or (with `sequence_ids`) in another packed sequence, reads zero. The backward takes
each output position u = t + i whose tap j = k − 1 − i reads x[t]:

    dpre[u] = dout[u] · silu'(pre[u]);   dx[t] = Σ_i weight[:, k − 1 − i] · dpre[t + i];
    dweight[:, k − 1 − i] = Σ_t dpre[t + i] · x[t]

A backward program recomputes pre at its k shifted positions from x (reads that hit the cache) instead of a round
trip of dpre through memory, and writes one float32 partial of dweight per tile; PyTorch sums the partials.
Products and sums run in float32. The reference is layers/short_conv.causal_conv1d followed by F.silu: compiled
by inductor, that took ~0.9 ms per layer of the 400M hybrid's training step on an H200 (benchmarks/RESULTS.md).
"""

from typing import Optional

import torch
import triton
import triton.language as tl

_BLOCK_STEPS = 64
_BLOCK_CHANNELS = 64


@triton.jit
def _same_sequence(ids_row, t, u, valid, HAS_IDS: tl.constexpr):
    """(BT,) valid, and with sequence ids steps t and u of the row in one sequence."""
    if HAS_IDS:
        a = tl.load(ids_row + t, mask=valid, other=0)
        b = tl.load(ids_row + u, mask=valid, other=0)
        valid = valid & (a == b)
    return valid


@triton.jit
def _preactivation(x_row, weight_ptr, ids_row, u, c, seq_len, channels,
                   KERNEL_SIZE: tl.constexpr, HAS_IDS: tl.constexpr):
    """pre (BT, BC) in float32 at steps u of one row, channels c."""
    in_channels = c < channels
    pre = tl.zeros((u.shape[0], c.shape[0]), dtype=tl.float32)
    for j in tl.static_range(KERNEL_SIZE):
        src = u - (KERNEL_SIZE - 1) + j
        taps = _same_sequence(ids_row, src, u, (src >= 0) & (u < seq_len), HAS_IDS)
        x = tl.load(x_row + src.to(tl.int64)[:, None] * channels + c[None, :],
                    mask=taps[:, None] & in_channels[None, :], other=0.0)
        weight = tl.load(weight_ptr + c * KERNEL_SIZE + j, mask=in_channels, other=0.0)
        pre += x.to(tl.float32) * weight.to(tl.float32)[None, :]
    return pre


@triton.jit
def short_conv_forward_kernel(x_ptr, weight_ptr, ids_ptr, out_ptr, seq_len, channels,
                              KERNEL_SIZE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
                              HAS_IDS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    rows = row * seq_len * channels
    pre = _preactivation(x_ptr + rows, weight_ptr, ids_ptr + row * seq_len, t, c, seq_len, channels,
                         KERNEL_SIZE, HAS_IDS)
    out = pre * tl.sigmoid(pre)
    offsets = rows + t.to(tl.int64)[:, None] * channels + c[None, :]
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=(t < seq_len)[:, None] & (c < channels)[None, :])


@triton.jit
def short_conv_backward_kernel(x_ptr, weight_ptr, ids_ptr, dout_ptr, dx_ptr, dweight_ptr, seq_len, channels,
                               KERNEL_SIZE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
                               HAS_IDS: tl.constexpr):
    # dweight_ptr: (B, time blocks, C, k) float32 partials
    row = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    in_channels = c < channels
    rows = row * seq_len * channels
    x_row = x_ptr + rows
    ids_row = ids_ptr + row * seq_len
    offsets = t.to(tl.int64)[:, None] * channels + c[None, :]
    tile = (t < seq_len)[:, None] & in_channels[None, :]
    x = tl.load(x_row + offsets, mask=tile, other=0.0).to(tl.float32)
    partial = dweight_ptr + ((row * tl.num_programs(1) + tl.program_id(1)) * channels + c) * KERNEL_SIZE

    dx = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for i in tl.static_range(KERNEL_SIZE):
        u = t + i
        pre = _preactivation(x_row, weight_ptr, ids_row, u, c, seq_len, channels, KERNEL_SIZE, HAS_IDS)
        sigmoid = tl.sigmoid(pre)
        reaches = _same_sequence(ids_row, t, u, u < seq_len, HAS_IDS)
        dout = tl.load(dout_ptr + rows + u.to(tl.int64)[:, None] * channels + c[None, :],
                       mask=reaches[:, None] & in_channels[None, :], other=0.0)
        dpre = dout.to(tl.float32) * sigmoid * (1.0 + pre * (1.0 - sigmoid))
        weight = tl.load(weight_ptr + c * KERNEL_SIZE + (KERNEL_SIZE - 1 - i), mask=in_channels, other=0.0)
        dx += dpre * weight.to(tl.float32)[None, :]
        tl.store(partial + (KERNEL_SIZE - 1 - i), tl.sum(dpre * x, axis=0), mask=in_channels)
    tl.store(dx_ptr + rows + offsets, dx.to(dx_ptr.dtype.element_ty), mask=tile)


def _grid(x: torch.Tensor) -> tuple[int, int, int]:
    batch, seq_len, channels = x.shape
    return batch, triton.cdiv(seq_len, _BLOCK_STEPS), triton.cdiv(channels, _BLOCK_CHANNELS)


def _launch_constants(weight: torch.Tensor, sequence_ids: Optional[torch.Tensor]) -> dict:
    return dict(KERNEL_SIZE=weight.shape[1], BLOCK_T=_BLOCK_STEPS, BLOCK_C=_BLOCK_CHANNELS,
                HAS_IDS=sequence_ids is not None, num_warps=4)


@torch.library.custom_op("m2rnn::short_conv", mutates_args=())
def short_conv_op(x: torch.Tensor, weight: torch.Tensor, sequence_ids: Optional[torch.Tensor]) -> torch.Tensor:
    x, weight = x.contiguous(), weight.contiguous()
    out = torch.empty_like(x)
    ids = sequence_ids.contiguous() if sequence_ids is not None else x
    short_conv_forward_kernel[_grid(x)](x, weight, ids, out, x.shape[1], x.shape[2],
                                        **_launch_constants(weight, sequence_ids))
    return out


@short_conv_op.register_fake
def _(x, weight, sequence_ids):
    return x.new_empty(x.shape)


@torch.library.custom_op("m2rnn::short_conv_backward", mutates_args=())
def short_conv_backward_op(
    x: torch.Tensor, weight: torch.Tensor, sequence_ids: Optional[torch.Tensor], dout: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    x, weight, dout = x.contiguous(), weight.contiguous(), dout.contiguous()
    grid = _grid(x)
    dx = torch.empty_like(x)
    partials = torch.empty(*grid[:2], *weight.shape, device=x.device, dtype=torch.float32)
    ids = sequence_ids.contiguous() if sequence_ids is not None else x
    short_conv_backward_kernel[grid](x, weight, ids, dout, dx, partials, x.shape[1], x.shape[2],
                                     **_launch_constants(weight, sequence_ids))
    return dx, partials.sum((0, 1)).to(weight.dtype)


@short_conv_backward_op.register_fake
def _(x, weight, sequence_ids, dout):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dout):
    x, weight, sequence_ids = ctx.saved_tensors
    dx, dweight = short_conv_backward_op(x, weight, sequence_ids, dout)
    return dx, dweight, None


short_conv_op.register_autograd(_backward, setup_context=_setup_context)
