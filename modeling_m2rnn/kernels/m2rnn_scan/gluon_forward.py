"""Forward scan kernel in Gluon: the twin of triton_forward.scan_forward_kernel with its layouts written out.

Triton chooses the layouts of a kernel itself, and for the state update it moves operands through shared memory
every step: H from the tensor cores' accumulator layout to the A-operand layout of the next H·W, and v_t from the
layout it is loaded in to the columns of the ACCUMULATOR (benchmarks/sass_report.py shows the stores, loads and
barriers). Here the layouts are chosen so that nothing on the step chain leaves the registers:
  - H (BR, BV) lives in the accumulator layout of a one-warp m16n8 tensor-core product. For 16-bit operands that
    layout holds, lane by lane, the elements the A operand needs, so H·W takes H as its A operand in registers.
  - W (BV, BV) is converted to the B-operand layout once, before the loop.
  - k_t and q_t are loaded straight into the ACCUMULATOR's row slice, v_t into its column slice, so k_t v_tᵀ is
    formed where the product accumulates.
The contract (arguments, outputs, checkpoints, packed sequences) is scan_forward_kernel's, for the launches that
`gluon_forward_supported` in triton_scan.py admits: one head per program on one warp, 16-bit inputs on a GPU with
tensor cores of compute capability 8.0 or newer. Not runnable by the Triton interpreter: the twin is what the CPU
tests check, and benchmarks/check_scan_gpu.py checks this kernel against the float64 reference on the GPU.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from .gluon_building_blocks import (
    ACCUMULATOR,
    B_OPERAND,
    COLUMNS,
    ROWS,
    STEPS,
    candidate,
    load_columns,
    load_gate,
    load_rows,
    store_column_sums,
)
from .triton_building_blocks import (
    checkpoint_slot_shift,
    chunk_bounds,
    input_gate,
    prefetch_steps,
    sequence_bounds,
)


@gluon.jit
def scan_forward_gluon_kernel(
    q_ptr, k_ptr, v_ptr, W_ptr, f_ptr, h0_ptr, cu_seqlens_ptr, y_ptr, h_final_ptr, checkpoint_ptr,
    seq_len, num_slots, y_partial_stride,
    N: gl.constexpr, NQ: gl.constexpr, NK: gl.constexpr, NV: gl.constexpr, NF: gl.constexpr, NW: gl.constexpr,
    K: gl.constexpr, V: gl.constexpr, BK: gl.constexpr, BV: gl.constexpr, HP: gl.constexpr, BR: gl.constexpr,
    CHUNK: gl.constexpr, HAS_H0: gl.constexpr, VARLEN: gl.constexpr, STORE_CHECKPOINTS: gl.constexpr,
    DOT_DTYPE: gl.constexpr, DOT_PRECISION: gl.constexpr, FAST_TANH: gl.constexpr, LANE_SUMS: gl.constexpr,
    PREFETCH: gl.constexpr,
):
    gl.static_assert(HP == 1, "one head per program")
    ROWS_MASKED: gl.constexpr = K % BR != 0
    COLUMNS_MASKED: gl.constexpr = V != BV

    state_row = gl.program_id(0)
    head = gl.program_id(1)
    rk = gl.program_id(2) * BR + gl.arange(0, BR, layout=ROWS)  # (BR,)
    rv = gl.arange(0, BV, layout=COLUMNS)  # (BV,)
    rows = gl.expand_dims(rk, 1)  # (BR, 1)
    columns = gl.expand_dims(rv, 0)  # (1, BV)
    batch, start, end = sequence_bounds(cu_seqlens_ptr, state_row, seq_len, VARLEN)

    # W of the head's group (V, V), zero-padded to (BV, BV), as the B operand.
    W_rows = gl.expand_dims(gl.arange(0, BV, layout=ROWS), 1)
    W_mask = (W_rows < V) & (columns < V)
    W = gl.load(W_ptr + ((head // (N // NW)) * V + W_rows) * V + columns, mask=W_mask, other=0.0)
    W = gl.convert_layout(W.to(DOT_DTYPE), B_OPERAND)

    state_mask = (rows < K) & (columns < V)
    state_offsets = (state_row.to(gl.int64) * N + head) * K * V + rows * V + columns
    if HAS_H0:
        H = gl.load(h0_ptr + state_offsets, mask=state_mask, other=0.0).to(gl.float32)
    else:
        H = gl.zeros([BR, BV], gl.float32, ACCUMULATOR)
    # Chunk 0's checkpoint slot (see checkpoint_offsets in triton_building_blocks).
    slot = (batch * N + head).to(gl.int64) * num_slots + checkpoint_slot_shift(state_row, VARLEN)
    checkpoint_offsets = (slot * BK + rows) * BV + columns
    y_partial_ptr = y_ptr + gl.program_id(2).to(gl.int64) * y_partial_stride + head * V  # y_t's row: + t · N · V

    for chunk in range(start // CHUNK, gl.cdiv(end, CHUNK)):
        chunk_start, chunk_end = chunk_bounds(chunk, start, end, CHUNK)
        if PREFETCH:
            if chunk_end < end:
                prefetch_steps(q_ptr, k_ptr, v_ptr, f_ptr, f_ptr, batch, chunk_end, end, seq_len, head,
                               gl.program_id(2) * BR, gl.arange(0, CHUNK, layout=STEPS),
                               N, NQ, NK, NV, NF, K, V, False, False)
        if STORE_CHECKPOINTS:
            gl.store(checkpoint_ptr + checkpoint_offsets + chunk * BK * BV, H.to(checkpoint_ptr.dtype.element_ty))
        # Step t + 1's inputs are loaded while step t computes (see scan_forward_kernel).
        q_t, k_t, v_t, f_t = _load_step(q_ptr, k_ptr, v_ptr, f_ptr, batch, chunk_start, seq_len, head, rk, rv,
                                        N, NQ, NK, NV, NF, K, V, ROWS_MASKED, COLUMNS_MASKED)
        for t in range(chunk_start, chunk_end):
            g_t = input_gate(f_t)
            q_next, k_next, v_next, f_next = _load_step(q_ptr, k_ptr, v_ptr, f_ptr, batch,
                                                        gl.minimum(t + 1, chunk_end - 1), seq_len, head, rk, rv,
                                                        N, NQ, NK, NV, NF, K, V, ROWS_MASKED, COLUMNS_MASKED)
            H = H + g_t * (candidate(H.to(DOT_DTYPE), W, k_t, v_t, FAST_TANH) - H)
            y_row = y_partial_ptr + (batch * seq_len + t).to(gl.int64) * N * V
            store_column_sums(y_row, gl.expand_dims(q_t, 1) * H, V, BR, BV, LANE_SUMS)
            q_t, k_t, v_t, f_t = q_next, k_next, v_next, f_next

    gl.store(h_final_ptr + state_offsets, H, mask=state_mask)


@gluon.jit
def _load_step(q_ptr, k_ptr, v_ptr, f_ptr, batch, t, seq_len, head, rk, rv,
               N: gl.constexpr, NQ: gl.constexpr, NK: gl.constexpr, NV: gl.constexpr, NF: gl.constexpr,
               K: gl.constexpr, V: gl.constexpr, ROWS_MASKED: gl.constexpr, COLUMNS_MASKED: gl.constexpr):
    """Step t's q_t, k_t (BR,) in the ACCUMULATOR's row slice and v_t (BV,) in its column slice, and f_t, float32;
    t a step of the sequence (see triton_building_blocks.load_step)."""
    return (load_rows(q_ptr, batch, t, seq_len, head, rk, N, NQ, K, ROWS_MASKED).to(gl.float32),
            load_rows(k_ptr, batch, t, seq_len, head, rk, N, NK, K, ROWS_MASKED).to(gl.float32),
            load_columns(v_ptr, batch, t, seq_len, head, rv, N, NV, V, COLUMNS_MASKED).to(gl.float32),
            load_gate(f_ptr, batch, t, seq_len, head, N, NF))
