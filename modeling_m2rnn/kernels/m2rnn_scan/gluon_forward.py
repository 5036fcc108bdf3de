"""Forward scan kernel in Gluon: the twin of triton_forward.scan_forward_kernel with its layouts written out.

Triton chooses the layouts of a kernel itself, and for the state update it moves operands through shared memory
every step: H from the tensor cores' accumulator layout to the A-operand layout of the next H·W, and v_t from the
layout it is loaded in to the columns of the accumulator (benchmarks/sass_report.py shows the stores, loads and
barriers). Here the layouts are chosen so that nothing on the step chain leaves the registers:
  - H (BR, BV) lives in the accumulator layout of a one-warp m16n8 tensor-core product. For 16-bit operands that
    layout holds, lane by lane, the elements the A operand needs, so H·W takes H as its A operand in registers.
  - W (BV, BV) is converted to the B-operand layout once, before the loop.
  - k_t and q_t are loaded straight into the accumulator's row slice, v_t into its column slice, so k_t v_tᵀ is
    formed where the product accumulates.
The contract (arguments, outputs, checkpoints, packed sequences) is scan_forward_kernel's, for the launches that
`gluon_forward_supported` in triton_scan.py admits: one head per program on one warp, 16-bit inputs on a GPU with
tensor cores of compute capability 8.0 or newer. Not runnable by the Triton interpreter: the twin is what the CPU
tests check, and benchmarks/check_scan_gpu.py checks this kernel against the float64 reference on the GPU.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from .triton_building_blocks import (
    _halve,
    _shuffle_xor,
    checkpoint_slot_shift,
    input_gate,
    prefetch_steps,
    sequence_bounds,
    tanh,
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
    accumulator: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8])
    a_operand: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=accumulator, k_width=2)
    b_operand: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=accumulator, k_width=2)
    rows_layout: gl.constexpr = gl.SliceLayout(1, accumulator)
    columns_layout: gl.constexpr = gl.SliceLayout(0, accumulator)
    steps_layout: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
    ROWS_MASKED: gl.constexpr = K % BR != 0
    COLUMNS_MASKED: gl.constexpr = V != BV

    state_row = gl.program_id(0)
    head = gl.program_id(1)
    rk = gl.program_id(2) * BR + gl.arange(0, BR, layout=rows_layout)  # (BR,)
    rv = gl.arange(0, BV, layout=columns_layout)  # (BV,)
    rows = gl.expand_dims(rk, 1)  # (BR, 1)
    columns = gl.expand_dims(rv, 0)  # (1, BV)
    batch, start, end = sequence_bounds(cu_seqlens_ptr, state_row, seq_len, VARLEN)

    # W of the head's group (V, V), zero-padded to (BV, BV), as the B operand.
    W_rows = gl.expand_dims(gl.arange(0, BV, layout=rows_layout), 1)
    W_mask = (W_rows < V) & (columns < V)
    W = gl.load(W_ptr + ((head // (N // NW)) * V + W_rows) * V + columns, mask=W_mask, other=0.0)
    W = gl.convert_layout(W.to(DOT_DTYPE), b_operand)

    state_mask = (rows < K) & (columns < V)
    state_offsets = (state_row.to(gl.int64) * N + head) * K * V + rows * V + columns
    if HAS_H0:
        H = gl.load(h0_ptr + state_offsets, mask=state_mask, other=0.0).to(gl.float32)
    else:
        H = gl.zeros([BR, BV], gl.float32, accumulator)
    # Chunk 0's checkpoint slot (see checkpoint_offsets in triton_building_blocks).
    slot = (batch * N + head).to(gl.int64) * num_slots + checkpoint_slot_shift(state_row, VARLEN)
    checkpoint_offsets = (slot * BK + rows) * BV + columns
    y_partial_ptr = y_ptr + gl.program_id(2).to(gl.int64) * y_partial_stride + head * V  # y_t's row: + t · N · V

    for chunk in range(start // CHUNK, gl.cdiv(end, CHUNK)):
        chunk_start = gl.maximum(start, chunk * CHUNK)
        chunk_end = gl.minimum(end, chunk * CHUNK + CHUNK)
        if PREFETCH:
            if chunk_end < end:
                prefetch_steps(q_ptr, k_ptr, v_ptr, f_ptr, f_ptr, batch, chunk_end, end, seq_len, head,
                               gl.program_id(2) * BR, gl.arange(0, CHUNK, layout=steps_layout),
                               N, NQ, NK, NV, NF, K, V, False, False)
        if STORE_CHECKPOINTS:
            gl.store(checkpoint_ptr + checkpoint_offsets + chunk * BK * BV, H.to(checkpoint_ptr.dtype.element_ty))
        q_t, k_t, v_t, f_t = _load_step(q_ptr, k_ptr, v_ptr, f_ptr, batch, chunk_start, seq_len, head, rk, rv,
                                        N, NQ, NK, NV, NF, K, V, ROWS_MASKED, COLUMNS_MASKED)
        for t in range(chunk_start, chunk_end):
            g_t = input_gate(f_t)
            t_next = gl.minimum(t + 1, chunk_end - 1)
            q_next, k_next, v_next, f_next = _load_step(q_ptr, k_ptr, v_ptr, f_ptr, batch, t_next, seq_len, head,
                                                        rk, rv, N, NQ, NK, NV, NF, K, V, ROWS_MASKED, COLUMNS_MASKED)
            outer = gl.expand_dims(k_t, 1) * gl.expand_dims(v_t, 0)
            Z = tanh(mma_v2(gl.convert_layout(H.to(DOT_DTYPE), a_operand), W, outer), FAST_TANH)
            H = H + g_t * (Z - H)
            y_row = y_partial_ptr + (batch * seq_len + t).to(gl.int64) * N * V
            _store_column_sums(y_row, gl.expand_dims(q_t, 1) * H, V, BR, BV, LANE_SUMS)
            q_t, k_t, v_t, f_t = q_next, k_next, v_next, f_next

    gl.store(h_final_ptr + state_offsets, H, mask=state_mask)


@gluon.jit
def _load_step(q_ptr, k_ptr, v_ptr, f_ptr, batch, t, seq_len, head, rk, rv,
               N: gl.constexpr, NQ: gl.constexpr, NK: gl.constexpr, NV: gl.constexpr, NF: gl.constexpr,
               K: gl.constexpr, V: gl.constexpr, ROWS_MASKED: gl.constexpr, COLUMNS_MASKED: gl.constexpr):
    """Step t's q_t, k_t (BR,) in the accumulator's row slice, v_t (BV,) in its column slice and f_t, float32,
    zero where padded; t a step of the sequence (see triton_building_blocks.load_step)."""
    row = (batch * seq_len + t).to(gl.int64)
    q_pointers = q_ptr + (row * NQ + head // (N // NQ)) * K + rk
    k_pointers = k_ptr + (row * NK + head // (N // NK)) * K + rk
    # One element per load (see load_step's UNPAIRED): pairs would be unpacked at the end of the step that loads them.
    v_pointers = v_ptr + gl.max_contiguous((row * NV + head // (N // NV)) * V + rv, [1])
    if ROWS_MASKED:
        q_t = gl.load(q_pointers, mask=rk < K, other=0.0)
        k_t = gl.load(k_pointers, mask=rk < K, other=0.0)
    else:
        q_t = gl.load(q_pointers)
        k_t = gl.load(k_pointers)
    if COLUMNS_MASKED:
        v_t = gl.load(v_pointers, mask=rv < V, other=0.0)
    else:
        v_t = gl.load(v_pointers)
    f_t = gl.load(f_ptr + row * NF + head // (N // NF))
    return q_t.to(gl.float32), k_t.to(gl.float32), v_t.to(gl.float32), f_t.to(gl.float32)


@gluon.jit
def _store_column_sums(row_ptr, x, V: gl.constexpr, BR: gl.constexpr, BV: gl.constexpr, LANE_SUMS: gl.constexpr):
    """Stores Σ over the rows of x (BR, BV), in the accumulator layout, into columns [0, V) at row_ptr, in
    row_ptr's dtype. LANE_SUMS: reduce-scattered across the lanes as triton_building_blocks._column_sums does
    (the layout's lanes and registers are the same), four shuffles where gl.sum takes twelve."""
    if LANE_SUMS:
        x = gl.sum(gl.reshape(x, (BR // 8, 8, BV)), axis=0)  # (8 g, BV): each lane's own rows summed first
        # (g, BV // 16 b, 4 j, 2 e, 2 a_low): column b·16 + a_low·8 + 2j + e
        first, second = gl.split(gl.permute(gl.reshape(x, (8, BV // 16, 2, 4, 2)), (0, 1, 3, 4, 2)))
        x = _halve(first, second, (_index(0, first) & 1) == 1, 4)  # lane bit 2 = g bit 0 keeps a_low
        first, second = gl.split(x)  # (g, b, j)
        g = _index(0, first)
        x = _halve(first, second, (g & 2) == 2, 8)  # g bit 1 keeps e
        x = x + _shuffle_xor(x, 16)
        columns = _index(1, x) * 16 + (g & 1) * 8 + 2 * _index(2, x) + (g >> 1 & 1)
        # Lanes with g >= 4 hold the same sums as those with g - 4.
        gl.store(row_ptr + columns, x.to(row_ptr.dtype.element_ty), mask=(g < 4) & (columns < V))
    else:
        columns = gl.arange(0, BV, layout=gl.SliceLayout(0, x.type.layout))
        gl.store(row_ptr + columns, gl.sum(x, axis=0).to(row_ptr.dtype.element_ty), mask=columns < V)


@gluon.jit
def _index(dim: gl.constexpr, x):
    """arange(0, x.shape[dim]) along `dim` of a tensor of x's rank, the other dims of size 1, in x's layout: for dim 0
    of a 4-D tensor or any dim of a 3-D one."""
    layout: gl.constexpr = x.type.layout
    if len(x.shape) == 4:
        gl.static_assert(dim == 0)
        index = gl.arange(0, x.shape[0], layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, layout))))
        return gl.expand_dims(gl.expand_dims(gl.expand_dims(index, 1), 2), 3)
    else:
        low: gl.constexpr = 1 if dim == 0 else 0  # the other two dims, low < high
        high: gl.constexpr = 1 if dim == 2 else 2
        index = gl.arange(0, x.shape[dim], layout=gl.SliceLayout(low, gl.SliceLayout(high, layout)))
        return gl.expand_dims(gl.expand_dims(index, low), high)
