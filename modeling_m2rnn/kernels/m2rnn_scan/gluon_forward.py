"""Forward scan kernel in Gluon: the twin of triton_forward.scan_forward_kernel with its layouts written out.

The math, the chunks, the checkpoints and the outputs are scan_forward_kernel's (see its doc). What the layouts
change (gluon_building_blocks):
  - The state stays in the accumulator layout of the H·W product, which for 16-bit operands is also its A-operand
    layout: the step's chain is the product, the tanh, the blend and the conversion to the dot dtype, with no
    shared-memory round trip and no barrier in it.
  - y_t = q_tᵀ H_t, the sum over the program's rows, runs on the tensor cores: H_t, transposed tile by tile in
    registers, is the B operand of a product with q_t in every row of the A operand. It reads the state but feeds
    nothing back into the chain. Its operands take q's dtype: q keeps its range, and H_t, in [-1, 1], is rounded to
    2^-9 (bf16; the twin sums float32 products) or 2^-11 (fp16).
For the launches that triton_scan admits (one head per program on one warp, 16-bit inputs, more than one step). The
Triton interpreter does not run Gluon: the CPU tests run this kernel's logic read as Triton
(tests/kernels/gluon_interpreter.py), and benchmarks/check_scan_gpu.py checks the kernel itself against the float64
reference on the GPU; fast_path.py runs it only where that check has run.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from .gluon_building_blocks import (
    A_OPERAND,
    ACCUMULATOR,
    B_OPERAND,
    ROWS,
    STEPS,
    load_columns,
    load_gate,
    load_rows,
    operand_k,
    program_block,
    transposed_b_operand,
)
from .triton_building_blocks import (
    checkpoint_slot_shift,
    chunk_bounds,
    input_gate,
    prefetch_steps,
    sequence_bounds,
    tanh,
)


@gluon.jit
def scan_forward_gluon_kernel(
    q_ptr, k_ptr, v_ptr, W_ptr, f_ptr, h0_ptr, cu_seqlens_ptr,
    y_ptr, h_final_ptr, checkpoint_ptr,
    seq_len, num_slots, y_partial_stride,
    N: gl.constexpr, NQ: gl.constexpr, NK: gl.constexpr, NV: gl.constexpr, NF: gl.constexpr, NW: gl.constexpr,
    K: gl.constexpr, V: gl.constexpr, BK: gl.constexpr, BV: gl.constexpr, HP: gl.constexpr, BR: gl.constexpr,
    CHUNK: gl.constexpr, HAS_H0: gl.constexpr, VARLEN: gl.constexpr, STORE_CHECKPOINTS: gl.constexpr,
    DOT_DTYPE: gl.constexpr, DOT_PRECISION: gl.constexpr, FAST_TANH: gl.constexpr, LANE_SUMS: gl.constexpr,
    PREFETCH: gl.constexpr,
):
    # The twin's arguments, so that one launch serves both kernels. DOT_PRECISION and LANE_SUMS go unused: the
    # products here are 16-bit tensor-core products, and y's sum over the rows is one of them.
    gl.static_assert(HP == 1, "one head per program")
    ROWS_MASKED: gl.constexpr = K % BR != 0
    COLUMNS_MASKED: gl.constexpr = V != BV

    state_row, head, rows_block, rk, rv = program_block(BR, BV)
    rows = gl.expand_dims(rk, 1)
    columns = gl.expand_dims(rv, 0)
    batch, start, end = sequence_bounds(cu_seqlens_ptr, state_row, seq_len, VARLEN)

    W_rows = gl.expand_dims(gl.arange(0, BV, layout=ROWS), 1)
    W = gl.load(W_ptr + (head // (N // NW)) * V * V + W_rows * V + columns, mask=(W_rows < V) & (columns < V),
                other=0.0)
    W_dot = gl.convert_layout(W.to(DOT_DTYPE), B_OPERAND)

    state_mask = (rows < K) & (columns < V)
    state_offsets = (state_row.to(gl.int64) * N + head) * K * V + rows * V + columns
    if HAS_H0:
        H = gl.load(h0_ptr + state_offsets, mask=state_mask, other=0.0).to(gl.float32)
    else:
        H = gl.zeros([BR, BV], gl.float32, ACCUMULATOR)

    slot = (batch * N + head).to(gl.int64) * num_slots + checkpoint_slot_shift(state_row, VARLEN)
    checkpoint_offsets = (slot * BK + rows) * BV + columns  # chunk 0's checkpoint
    y_partial_ptr = y_ptr + rows_block.to(gl.int64) * y_partial_stride + head * V
    rk_operand = rows_block * BR + operand_k(BR, A_OPERAND)  # the program's rows along the A operand's k
    y_rows = gl.expand_dims(gl.arange(0, 16, layout=ROWS), 1)
    y_mask = (y_rows == 0) & (columns < V)
    place = (batch, seq_len, head, rk, rk_operand, rv)
    inputs = (q_ptr, k_ptr, v_ptr, f_ptr)

    for chunk in range(start // CHUNK, gl.cdiv(end, CHUNK)):
        chunk_start, chunk_end = chunk_bounds(chunk, start, end, CHUNK)
        if PREFETCH:
            # Into L1 this chunk's rows, into L2 the next chunk's. A step's inputs are loaded about a hundred
            # instructions before their first use (below); with one warp on a scheduler that does not cover a load
            # from L2, and the step would wait for it.
            steps = gl.arange(0, CHUNK, layout=STEPS)
            prefetch_steps(q_ptr, k_ptr, v_ptr, f_ptr, f_ptr, batch, chunk_start, chunk_end, seq_len, head,
                           rows_block * BR, steps, N, NQ, NK, NV, NF, K, V, False, True)
            if chunk_end < end:
                prefetch_steps(q_ptr, k_ptr, v_ptr, f_ptr, f_ptr, batch, chunk_end, end, seq_len, head,
                               rows_block * BR, steps, N, NQ, NK, NV, NF, K, V, False, False)
        if STORE_CHECKPOINTS:
            gl.store(checkpoint_ptr + checkpoint_offsets + chunk * BK * BV, H.to(checkpoint_ptr.dtype.element_ty))
        # Step t + 1's inputs are loaded at the top of step t and turned into its operands (k v_tᵀ, 1 - f, q in every
        # row) at the end: loads whose values were first used in the next step would be scheduled at the end of this
        # one, and the next step would wait for them at its top.
        operands = _operands(_load_inputs(chunk_start, inputs, place, N, NQ, NK, NV, NF, K, V, ROWS_MASKED,
                                          COLUMNS_MASKED), BR)
        H_dot = H.to(DOT_DTYPE)
        for t in range(chunk_start, chunk_end):
            outer, g_t, q_rows = operands
            loaded = _load_inputs(gl.minimum(t + 1, chunk_end - 1), inputs, place, N, NQ, NK, NV, NF, K, V,
                                  ROWS_MASKED, COLUMNS_MASKED)
            Z = tanh(mma_v2(gl.convert_layout(H_dot, A_OPERAND), W_dot, outer), FAST_TANH)
            H = H + g_t * (Z - H)
            H_dot = H.to(DOT_DTYPE)
            # y_t = q_tᵀ H_t: every row of the (16, BV) product holds it; row 0 is stored.
            y_t = mma_v2(q_rows, transposed_b_operand(H.to(q_rows.dtype), BR, BV),
                         gl.zeros([16, BV], gl.float32, ACCUMULATOR))
            y_row = y_partial_ptr + (batch * seq_len + t).to(gl.int64) * N * V
            gl.store(y_row + y_rows * 0 + columns, y_t.to(y_ptr.dtype.element_ty), mask=y_mask)
            operands = _operands(loaded, BR)

    gl.store(h_final_ptr + state_offsets, H, mask=state_mask)


@gluon.jit
def _load_inputs(t, inputs, place, N: gl.constexpr, NQ: gl.constexpr, NK: gl.constexpr, NV: gl.constexpr,
                 NF: gl.constexpr, K: gl.constexpr, V: gl.constexpr, ROWS_MASKED: gl.constexpr,
                 COLUMNS_MASKED: gl.constexpr):
    """Step t's inputs as loaded: k_t (BR,) and v_t (BV,) in the state's row and column slices, q_t along the A
    operand's contraction, f_t."""
    q_ptr, k_ptr, v_ptr, f_ptr = inputs
    batch, seq_len, head, rk, rk_operand, rv = place
    # q first: ptxas then issues every load of the step further from its first use (sass_report's load-to-use
    # distance).
    q_t = load_rows(q_ptr, batch, t, seq_len, head, rk_operand, N, NQ, K, ROWS_MASKED)
    return (load_rows(k_ptr, batch, t, seq_len, head, rk, N, NK, K, ROWS_MASKED),
            load_columns(v_ptr, batch, t, seq_len, head, rv, N, NV, V, COLUMNS_MASKED),
            q_t,
            load_gate(f_ptr, batch, t, seq_len, head, N, NF))


@gluon.jit
def _operands(loaded, BR: gl.constexpr):
    """What a step computes with, from its inputs: k_t v_tᵀ (BR, BV) in the accumulator layout, float32 (the H·W
    product adds onto it); 1 - f_t; q_t in every row of a (16, BR) A operand (y_t = q_tᵀ H_t)."""
    k_t, v_t, q_t, f_t = loaded
    outer = gl.expand_dims(k_t.to(gl.float32), 1) * gl.expand_dims(v_t.to(gl.float32), 0)
    q_rows = gl.expand_dims(q_t, 0).broadcast_to(16, BR)
    return outer, input_gate(f_t), q_rows
