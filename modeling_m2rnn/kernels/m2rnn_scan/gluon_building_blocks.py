"""Gluon building blocks shared by the forward and backward scan kernels (gluon_forward.py, gluon_backward.py).

A program runs on one warp and holds its (BR, BV) block of the state in the accumulator layout of m16n8 tensor-core
products: lane 4g + j holds rows 8i + g and columns 8a + 2j + e (e < 2), as triton_building_blocks describes. For
16-bit operands that is also the A-operand layout, so H·W takes H as its A operand without moving it; the transposes
other products need happen in registers (transpose_tiles).
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from .triton_building_blocks import tanh

# The layouts of a one-warp program: a (BR, BV) block in the accumulator of m16n8 tensor-core products, the A and B
# operands of those products (16-bit, two elements per register), the block's row and column slices, and one step per
# lane for a chunk's prefetch.
ACCUMULATOR = gl.constexpr(gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8]))
A_OPERAND = gl.constexpr(gl.DotOperandLayout(operand_index=0, parent=ACCUMULATOR.value, k_width=2))
B_OPERAND = gl.constexpr(gl.DotOperandLayout(operand_index=1, parent=ACCUMULATOR.value, k_width=2))
ROWS = gl.constexpr(gl.SliceLayout(1, ACCUMULATOR.value))
COLUMNS = gl.constexpr(gl.SliceLayout(0, ACCUMULATOR.value))
STEPS = gl.constexpr(gl.BlockedLayout([1], [32], [1], [0]))


@gluon.jit
def transpose_tiles(x):
    """x (16-bit, in a tensor-core fragment layout) with every 8×8 tile transposed in registers (one movmatrix per
    tile): x'[8p + r, 8s + c] = x[8p + c, 8s + r]."""
    return gl.inline_asm_elementwise("movmatrix.sync.aligned.m8n8.trans.b16 $0, $1;", "=r,r", [x], dtype=x.dtype,
                                     is_pure=True, pack=2)


@gluon.jit
def transposed_a_operand(x, BR: gl.constexpr, BV: gl.constexpr):
    """xᵀ (BV, BR) as an A operand, from x (BR, BV, 16-bit) in the accumulator layout, without leaving the registers:
    the tiles transposed in place and renamed (the layout conversion is checked to move nothing)."""
    x = transpose_tiles(x)
    x = gl.reshape(gl.permute(gl.reshape(x, (BR // 8, 8, BV // 8, 8)), (2, 1, 0, 3)), (BV, BR))
    return gl.convert_layout(x, A_OPERAND, assert_trivial=True)


@gluon.jit
def transposed_b_operand(x, BR: gl.constexpr, BV: gl.constexpr):
    """x (BR, BV, 16-bit) as a B operand (contracting over its rows), from the accumulator layout, in registers."""
    x = transpose_tiles(x)
    x = gl.reshape(gl.permute(gl.reshape(x, (BR // 8, 8, BV // 8, 8)), (0, 3, 2, 1)), (BR, BV))
    return gl.convert_layout(x, B_OPERAND, assert_trivial=True)


@gluon.jit
def operand_k(size: gl.constexpr, operand: gl.constexpr):
    """arange(0, size) along the contraction dim of a dot operand layout (dim 1 of A, dim 0 of B)."""
    return gl.arange(0, size, layout=gl.SliceLayout(operand.operand_index, operand))


@gluon.jit
def program_block(BR: gl.constexpr, BV: gl.constexpr):
    """The program's place in the (state, head, row block) grid, and its state rows (BR,) and columns (BV,) in the
    row and column slices of the accumulator layout: (state_row, head, rows_block, rk, rv)."""
    rows_block = gl.program_id(2)
    rk = rows_block * BR + gl.arange(0, BR, layout=ROWS)
    rv = gl.arange(0, BV, layout=COLUMNS)
    return gl.program_id(0), gl.program_id(1), rows_block, rk, rv


@gluon.jit
def candidate(H_dot, W_dot, k_t, v_t, FAST_TANH: gl.constexpr):
    """Z_t = tanh(H_{t-1} W + k_t v_tᵀ), float32 (BR, BV) in the accumulator layout: H_dot (BR, BV) in the dot dtype
    in the accumulator layout, W_dot its B operand, k_t (BR,) and v_t (BV,) in its row and column slices, float32."""
    outer = gl.expand_dims(k_t, 1) * gl.expand_dims(v_t, 0)
    return tanh(mma_v2(gl.convert_layout(H_dot, A_OPERAND), W_dot, outer), FAST_TANH)


@gluon.jit
def load_rows(x_ptr, batch, t, seq_len, head, r, N: gl.constexpr, NX: gl.constexpr, K: gl.constexpr,
               MASKED: gl.constexpr):
    """Rows r (in r's layout) of step t's q or k row for `head` (group head // (N / NX)), zero past K."""
    pointers = x_ptr + ((batch * seq_len + t).to(gl.int64) * NX + head // (N // NX)) * K + r
    if MASKED:
        return gl.load(pointers, mask=r < K, other=0.0)
    else:
        return gl.load(pointers)


@gluon.jit
def load_columns(x_ptr, batch, t, seq_len, head, c, N: gl.constexpr, NX: gl.constexpr, V: gl.constexpr,
                  MASKED: gl.constexpr):
    """Columns c (in c's layout) of step t's v or dy row for `head`, one element per load (see
    triton_building_blocks.load_step), zero past V."""
    pointers = x_ptr + gl.max_contiguous(((batch * seq_len + t).to(gl.int64) * NX + head // (N // NX)) * V + c, [1])
    if MASKED:
        return gl.load(pointers, mask=c < V, other=0.0)
    else:
        return gl.load(pointers)


@gluon.jit
def load_gate(f_ptr, batch, t, seq_len, head, N: gl.constexpr, NF: gl.constexpr):
    """f_t of `head`, float32."""
    return gl.load(f_ptr + (batch * seq_len + t).to(gl.int64) * NF + head // (N // NF)).to(gl.float32)
