"""The M2RNN layer's output gate and norm on Triton, forward and backward (docs/design.md, "The layer"), per token:

    u = y + D ⊙ v;   z = u ⊙ silu(g);   out = weight ⊙ z · rstd,   rstd = 1 / sqrt(mean(z²) + eps)

over the C = N·V values of a token (every head has its own v and g). The backward, with x̂ = z · rstd:

    dz = rstd · (dout ⊙ weight − x̂ · mean(dout ⊙ weight ⊙ x̂));   du = dz ⊙ silu(g)
    dy = du;   dv = D ⊙ du;   dg = dz ⊙ u ⊙ silu'(g);   dD = Σ_tokens du ⊙ v;   dweight = Σ_tokens dout ⊙ x̂

Everything runs in float32; each output is rounded once. Under torch.compile the PyTorch form (naive.py) makes two
passes over each token's values forward and backward, and kernels of their own for dD and for D ⊙ v's gradient. Here
a program normalises FORWARD_TILE tokens forward; backward, it walks BACKWARD_ROWS tokens, keeping its dD and dweight
partials in registers.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from ..backend import launches_directly

# Launch settings (benchmarks/bench_gated_norm.py compares others). The backward takes one token at a time: two or
# four at once need more registers, which leaves fewer programs in flight.
FORWARD_TILE = 2       # tokens of one forward program
BACKWARD_ROWS = 32     # tokens of one backward program, one at a time: one dD and one dweight partial each
WARPS = 8


@triton.jit
def _load_row(ptr, c, in_columns):
    """A (1, BLOCK_C) row of C values in float32, zero past C: the norm weight or D, loaded once per program."""
    return tl.load(ptr + c, mask=in_columns, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _token_inputs(y_ptr, v_ptr, g_ptr, offsets, mask, HAS_RESIDUAL: tl.constexpr):
    """y, g and v (zero without the residual) in float32 at `offsets` (TILE, BLOCK_C)."""
    y = tl.load(y_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    v = tl.zeros_like(y)
    if HAS_RESIDUAL:
        v = tl.load(v_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    return y, g, v


@triton.jit
def _tile(first, last, C: tl.constexpr, BLOCK_C: tl.constexpr, TILE: tl.constexpr):
    """Tokens first, first + 1, ... (TILE,) below `last`, their offsets and mask (TILE, BLOCK_C), columns c."""
    rows = first + tl.arange(0, TILE)
    c = tl.arange(0, BLOCK_C)
    in_rows, in_columns = rows < last, c < C
    return rows, rows[:, None] * C + c[None, :], in_rows[:, None] & in_columns[None, :], c, in_columns


@triton.jit
def gated_norm_forward_kernel(y_ptr, v_ptr, D_ptr, g_ptr, weight_ptr, out_ptr, rstd_ptr, eps, num_rows,
                              C: tl.constexpr, BLOCK_C: tl.constexpr, TILE: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """out and rstd of TILE tokens."""
    first = tl.program_id(0).to(tl.int64) * TILE
    rows, offsets, mask, c, in_columns = _tile(first, num_rows, C, BLOCK_C, TILE)
    u, g, v = _token_inputs(y_ptr, v_ptr, g_ptr, offsets, mask, HAS_RESIDUAL)
    if HAS_RESIDUAL:   # D after the tokens: loaded before them, it delays the tokens' loads
        u += _load_row(D_ptr, c, in_columns) * v
    z = u * g * tl.sigmoid(g)
    rstd = 1.0 / tl.sqrt(tl.sum(z * z, axis=1) / C + eps)   # (TILE,)
    weight = _load_row(weight_ptr, c, in_columns)
    tl.store(out_ptr + offsets, (weight * z * rstd[:, None]).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=rows < num_rows)


@triton.jit
def gated_norm_backward_kernel(y_ptr, v_ptr, D_ptr, g_ptr, weight_ptr, rstd_ptr, dout_ptr,
                               dy_ptr, dv_ptr, dg_ptr, dD_partial_ptr, dweight_partial_ptr, num_rows,
                               C: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr,
                               HAS_RESIDUAL: tl.constexpr):
    """dy, dv, dg of ROWS tokens, one at a time, and their float32 partials of dD and dweight (a row of C each)."""
    program = tl.program_id(0)
    first = program.to(tl.int64) * ROWS
    last = tl.minimum(first + ROWS, num_rows)
    c = tl.arange(0, BLOCK_C)
    weight = _load_row(weight_ptr, c, c < C)
    D = tl.zeros((1, BLOCK_C), dtype=tl.float32)
    if HAS_RESIDUAL:   # once per program, not once per token
        D = _load_row(D_ptr, c, c < C)
    dD = tl.zeros((1, BLOCK_C), dtype=tl.float32)
    dweight = tl.zeros((1, BLOCK_C), dtype=tl.float32)
    for token in range(first, last):
        rows, offsets, mask, c, in_columns = _tile(token, last, C, BLOCK_C, 1)
        u, g, v = _token_inputs(y_ptr, v_ptr, g_ptr, offsets, mask, HAS_RESIDUAL)
        if HAS_RESIDUAL:
            u += D * v
        dout = tl.load(dout_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=rows < last, other=0.0)[:, None]
        sigmoid = tl.sigmoid(g)
        silu = g * sigmoid
        normed = u * silu * rstd
        dnormed = dout * weight
        dz = rstd * (dnormed - normed * (tl.sum(dnormed * normed, axis=1)[:, None] / C))
        du = dz * silu
        dweight += dout * normed
        tl.store(dy_ptr + offsets, du.to(dy_ptr.dtype.element_ty), mask=mask)
        tl.store(dg_ptr + offsets, (dz * u * sigmoid * (1.0 + g * (1.0 - sigmoid))).to(dg_ptr.dtype.element_ty),
                 mask=mask)
        if HAS_RESIDUAL:
            tl.store(dv_ptr + offsets, (D * du).to(dv_ptr.dtype.element_ty), mask=mask)
            dD += du * v
    tl.store(dweight_partial_ptr + program * C + c, tl.sum(dweight, axis=0), mask=c < C)
    tl.store(dD_partial_ptr + program * C + c, tl.sum(dD, axis=0), mask=c < C)


def _constants(y: torch.Tensor, D: Optional[torch.Tensor]) -> dict:
    channels = y.shape[2] * y.shape[3]
    return dict(C=channels, BLOCK_C=triton.next_power_of_2(channels), HAS_RESIDUAL=D is not None, num_warps=WARPS)


def _residual_arguments(y, v, D) -> tuple:
    """v and D, or stand-ins never read without the residual."""
    return (v.contiguous(), D.contiguous()) if D is not None else (y, y)


def gated_rms_norm_forward(y, v, D, g, weight, eps, out_dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel: (out, rstd). Called without the op dispatcher when no gradient is needed."""
    y, g = y.contiguous(), g.contiguous()
    out = torch.empty(*y.shape[:2], y.shape[2] * y.shape[3], device=y.device, dtype=out_dtype)
    rstd = torch.empty(y.shape[:2], device=y.device, dtype=torch.float32)
    num_rows = y.shape[0] * y.shape[1]
    gated_norm_forward_kernel[(triton.cdiv(num_rows, FORWARD_TILE),)](
        y, *_residual_arguments(y, v, D), g, weight.contiguous(), out, rstd, eps, num_rows, TILE=FORWARD_TILE,
        **_constants(y, D),
    )
    return out, rstd


@torch.library.custom_op("m2rnn::gated_rms_norm", mutates_args=())
def gated_rms_norm_op(
    y: torch.Tensor, v: Optional[torch.Tensor], D: Optional[torch.Tensor], g: torch.Tensor, weight: torch.Tensor,
    eps: float, out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    return gated_rms_norm_forward(y, v, D, g, weight, eps, out_dtype)


@gated_rms_norm_op.register_fake
def _(y, v, D, g, weight, eps, out_dtype):
    return y.new_empty(*y.shape[:2], y.shape[2] * y.shape[3], dtype=out_dtype), y.new_empty(y.shape[:2],
                                                                                           dtype=torch.float32)


@torch.library.custom_op("m2rnn::gated_rms_norm_backward", mutates_args=())
def gated_rms_norm_backward_op(
    y: torch.Tensor, v: Optional[torch.Tensor], D: Optional[torch.Tensor], g: torch.Tensor, weight: torch.Tensor,
    rstd: torch.Tensor, dout: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dy, dv, dD, dg, dweight); dv and dD are empty without the residual."""
    y, g, dout = y.contiguous(), g.contiguous(), dout.contiguous()
    num_rows = y.shape[0] * y.shape[1]
    programs = triton.cdiv(num_rows, BACKWARD_ROWS)
    channels = weight.numel()
    dy, dg = torch.empty_like(y), torch.empty_like(g)
    dv = torch.empty_like(v) if D is not None else y.new_empty(0)
    dD_partial, dweight_partial = (torch.empty(programs, channels, device=y.device, dtype=torch.float32)
                                   for _ in range(2))
    gated_norm_backward_kernel[(programs,)](
        y, *_residual_arguments(y, v, D), g, weight.contiguous(), rstd, dout, dy, dv, dg, dD_partial, dweight_partial,
        num_rows, ROWS=BACKWARD_ROWS, **_constants(y, D),
    )
    dD = dD_partial.sum(0).view_as(D).to(D.dtype) if D is not None else y.new_empty(0)
    return dy, dv, dD, dg, dweight_partial.sum(0).to(weight.dtype)


@gated_rms_norm_backward_op.register_fake
def _(y, v, D, g, weight, rstd, dout):
    dv = v.new_empty(v.shape) if D is not None else y.new_empty(0)
    dD = D.new_empty(D.shape) if D is not None else y.new_empty(0)
    return y.new_empty(y.shape), dv, dD, g.new_empty(g.shape), weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output):
    y, v, D, g, weight, _eps, _out_dtype = inputs
    ctx.save_for_backward(y, v, D, g, weight, output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dout, _drstd):
    y, v, D, g, weight, rstd = ctx.saved_tensors
    dy, dv, dD, dg, dweight = gated_rms_norm_backward_op(y, v, D, g, weight, rstd, dout)
    if D is None:
        dv = dD = None
    return dy, dv, dD, dg, dweight, None, None


gated_rms_norm_op.register_autograd(_backward, setup_context=_setup_context)


def gated_rms_norm_triton(y, g, weight, eps: float, v, D, out_dtype: torch.dtype) -> torch.Tensor:
    """The op on the kernels (inputs validated, one v and g per head). See the module doc."""
    if launches_directly(y, g, weight, v, D):
        return gated_rms_norm_forward(y, v, D, g, weight, eps, out_dtype)[0]
    return gated_rms_norm_op(y, v, D, g, weight, eps, out_dtype)[0]
