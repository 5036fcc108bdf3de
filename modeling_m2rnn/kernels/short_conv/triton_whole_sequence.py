"""The short convolution of whole sequences and its SiLU on Triton, forward and backward, for training and prefill:

    pre[t, c] = Σ_j weight[c, j] · x[t − (k − 1) + j, c],   out = silu(pre)        per row of x (B, S, C)

A tap before the row's start, or (with `sequence_ids`) in another packed sequence, reads zero. The backward takes
each output position u = t + i whose tap j = k − 1 − i reads x[t]:

    dpre[u] = dout[u] · silu'(pre[u]);   dx[t] = Σ_i weight[:, k − 1 − i] · dpre[t + i];
    dweight[:, k − 1 − i] = Σ_t dpre[t + i] · x[t]

The output's channels may be split into up to three blocks (q, k, v), each written to a contiguous tensor of its own,
so that no copy follows the op: the scan reads q, k, v contiguous, and copies of slices of one output were kernels of
their own forward and backward, where torch.compile fuses them into a PyTorch conv. The gradients are read from the
three tensors.

The backward is two kernels: dpre (float32) through memory, then dx and one float32 partial of dweight per tile,
which PyTorch sums: one kernel recomputing pre at the k shifted positions instead is slower. Products and sums run in
float32. The reference is naive.causal_conv1d followed by F.silu.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

# Tiles of 32 steps x 64 channels on 2 warps: faster both ways than 64 x 64 on 4 warps at the 400M layer's shape.
_BLOCK_STEPS = 32
_BLOCK_CHANNELS = 64
_WARPS = 2


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
def _block(position, c, first, width):
    """Offsets (BT, BC) of steps `position` (row · S + t) and channels c in the block [first, first + width) of a
    split tensor, which is (B, S, width), and which channels of c are in that block (BC,)."""
    return position[:, None] * width + (c - first)[None, :], (c >= first) & (c < first + width)


@triton.jit
def _split_offsets(position, c, width0, width1, channels):
    """(offsets, channel masks) of the three blocks [0, width0), [width0, width0 + width1), [.., channels)."""
    offsets0, in0 = _block(position, c, 0, width0)
    offsets1, in1 = _block(position, c, width0, width1)
    offsets2, in2 = _block(position, c, width0 + width1, channels - width0 - width1)
    return offsets0, in0, offsets1, in1, offsets2, in2


@triton.jit
def short_conv_forward_kernel(x_ptr, weight_ptr, ids_ptr, out0_ptr, out1_ptr, out2_ptr, width0, width1, dpre_ptr,
                              seq_len, channels,
                              KERNEL_SIZE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
                              HAS_IDS: tl.constexpr, GRADIENT: tl.constexpr):
    """out = silu(pre) on a tile, into the three blocks out0, out1, out2 of the channels. With GRADIENT, the
    backward's first kernel: the blocks hold dout, read, and dpre = dout · silu'(pre) is written to dpre (B, S, C)."""
    row = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    rows = row * seq_len * channels
    pre = _preactivation(x_ptr + rows, weight_ptr, ids_ptr + row * seq_len, t, c, seq_len, channels,
                         KERNEL_SIZE, HAS_IDS)
    in_steps = (t < seq_len)[:, None]
    offsets0, in0, offsets1, in1, offsets2, in2 = _split_offsets(row * seq_len + t, c, width0, width1, channels)
    sigmoid = tl.sigmoid(pre)
    if GRADIENT:
        dout = tl.load(out0_ptr + offsets0, mask=in_steps & in0[None, :], other=0.0).to(tl.float32)
        dout += tl.load(out1_ptr + offsets1, mask=in_steps & in1[None, :], other=0.0).to(tl.float32)
        dout += tl.load(out2_ptr + offsets2, mask=in_steps & in2[None, :], other=0.0).to(tl.float32)
        dpre = dout * sigmoid * (1.0 + pre * (1.0 - sigmoid))
        offsets = rows + t.to(tl.int64)[:, None] * channels + c[None, :]
        tl.store(dpre_ptr + offsets, dpre, mask=in_steps & (c < channels)[None, :])
    else:
        out = (pre * sigmoid).to(out0_ptr.dtype.element_ty)
        tl.store(out0_ptr + offsets0, out, mask=in_steps & in0[None, :])
        tl.store(out1_ptr + offsets1, out, mask=in_steps & in1[None, :])
        tl.store(out2_ptr + offsets2, out, mask=in_steps & in2[None, :])


@triton.jit
def short_conv_backward_kernel(x_ptr, weight_ptr, ids_ptr, dpre_ptr, dx_ptr, dweight_ptr, seq_len, channels,
                               KERNEL_SIZE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
                               HAS_IDS: tl.constexpr):
    """The backward's second kernel: dx and the tile's dweight partials (B, time blocks, C, k) from dpre."""
    row = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    in_channels = c < channels
    rows = row * seq_len * channels
    ids_row = ids_ptr + row * seq_len
    offsets = t.to(tl.int64)[:, None] * channels + c[None, :]
    tile = (t < seq_len)[:, None] & in_channels[None, :]
    x = tl.load(x_ptr + rows + offsets, mask=tile, other=0.0).to(tl.float32)
    partial = dweight_ptr + ((row * tl.num_programs(1) + tl.program_id(1)) * channels + c) * KERNEL_SIZE
    dx = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for i in tl.static_range(KERNEL_SIZE):
        u = t + i
        reaches = _same_sequence(ids_row, t, u, u < seq_len, HAS_IDS)
        dpre = tl.load(dpre_ptr + rows + u.to(tl.int64)[:, None] * channels + c[None, :],
                       mask=reaches[:, None] & in_channels[None, :], other=0.0)
        weight = tl.load(weight_ptr + c * KERNEL_SIZE + (KERNEL_SIZE - 1 - i), mask=in_channels, other=0.0)
        dx += dpre * weight.to(tl.float32)[None, :]
        tl.store(partial + (KERNEL_SIZE - 1 - i), tl.sum(dpre * x, axis=0), mask=in_channels)
    tl.store(dx_ptr + rows + offsets, dx.to(dx_ptr.dtype.element_ty), mask=tile)


def _grid(x: torch.Tensor) -> tuple[int, int, int]:
    batch, seq_len, channels = x.shape
    return batch, triton.cdiv(seq_len, _BLOCK_STEPS), triton.cdiv(channels, _BLOCK_CHANNELS)


def _launch_constants(weight: torch.Tensor, sequence_ids: Optional[torch.Tensor]) -> dict:
    return dict(KERNEL_SIZE=weight.shape[1], BLOCK_T=_BLOCK_STEPS, BLOCK_C=_BLOCK_CHANNELS,
                HAS_IDS=sequence_ids is not None, num_warps=_WARPS)


def _split_arguments(blocks: list[torch.Tensor]) -> tuple:
    """The kernel's three block pointers and the first two widths; missing blocks are empty (never touched)."""
    widths = [block.shape[-1] for block in blocks] + [0] * (3 - len(blocks))
    pointers = blocks + [blocks[0]] * (3 - len(blocks))
    return (*pointers, widths[0], widths[1])


@torch.library.custom_op("m2rnn::short_conv", mutates_args=())
def short_conv_op(
    x: torch.Tensor, weight: torch.Tensor, sequence_ids: Optional[torch.Tensor], split_sizes: list[int]
) -> list[torch.Tensor]:
    x, weight = x.contiguous(), weight.contiguous()
    blocks = [x.new_empty(*x.shape[:2], size) for size in split_sizes]
    ids = sequence_ids.contiguous() if sequence_ids is not None else x
    short_conv_forward_kernel[_grid(x)](x, weight, ids, *_split_arguments(blocks), x, x.shape[1], x.shape[2],
                                        **_launch_constants(weight, sequence_ids), GRADIENT=False)
    return blocks


@short_conv_op.register_fake
def _(x, weight, sequence_ids, split_sizes):
    return [x.new_empty(*x.shape[:2], size) for size in split_sizes]


@torch.library.custom_op("m2rnn::short_conv_backward", mutates_args=())
def short_conv_backward_op(
    x: torch.Tensor, weight: torch.Tensor, sequence_ids: Optional[torch.Tensor], dout: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    x, weight = x.contiguous(), weight.contiguous()
    dout = [block.contiguous() for block in dout]
    grid = _grid(x)
    dx = torch.empty_like(x)
    partials = torch.empty(*grid[:2], *weight.shape, device=x.device, dtype=torch.float32)
    ids = sequence_ids.contiguous() if sequence_ids is not None else x
    dpre = torch.empty(x.shape, device=x.device, dtype=torch.float32)
    short_conv_forward_kernel[grid](x, weight, ids, *_split_arguments(dout), dpre, x.shape[1], x.shape[2],
                                    **_launch_constants(weight, sequence_ids), GRADIENT=True)
    short_conv_backward_kernel[grid](x, weight, ids, dpre, dx, partials, x.shape[1], x.shape[2],
                                     **_launch_constants(weight, sequence_ids))
    return dx, partials.sum((0, 1)).to(weight.dtype)


@short_conv_backward_op.register_fake
def _(x, weight, sequence_ids, dout):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output):
    x, weight, sequence_ids, _split_sizes = inputs
    ctx.save_for_backward(x, weight, sequence_ids)


def _backward(ctx, dout):
    x, weight, sequence_ids = ctx.saved_tensors
    dx, dweight = short_conv_backward_op(x, weight, sequence_ids, dout)
    return dx, dweight, None, None


short_conv_op.register_autograd(_backward, setup_context=_setup_context)
