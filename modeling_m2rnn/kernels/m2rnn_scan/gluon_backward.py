"""Backward scan kernel in Gluon: the twin of triton_backward.scan_backward_kernel with its layouts written out.

The math, the chunks, the segments and the outputs are scan_backward_kernel's (see its doc). What the layouts change:
  - The state and every per-step matrix (Z, G, dA, dH) live in the accumulator layout of a one-warp m16n8 tensor-core
    product (lane 4g + j holds rows 8i + g and columns 8a + 2j + e, e < 2, as triton_building_blocks describes),
    which for 16-bit operands is also the A-operand layout: H·W, dA·Wᵀ take their A operand in registers.
  - Loads return the input dtype: what the step computes with in float32 is converted where it is loaded (a step
    ahead, so the conversion lands at the top of the next step); tensor-core operands stay 16-bit.
  - The replay keeps H_{t-1} in the scratch in that layout, each thread storing and loading its own elements, 16 bytes
    at a time: no barrier, no conversion. (Keeping Z_t too would spare the walk its tanh and H·W, but the scratch of
    all programs would then outgrow the L2 cache at the 400M shape, and the walk would wait on device memory.)
  - The transposes that dW = H_{t-1}ᵀ dA and dv = dAᵀ k need happen in registers, one movmatrix per 8×8 tile
    (transpose_tiles), and the sums over a row (dq = H_t dy, dk = dA v) and over the rows (dv, dW) run on the tensor
    cores instead of as shuffles.
For the launches that triton_scan admits (one head per program on one warp, 16-bit inputs). The Triton interpreter
does not run Gluon: the CPU tests run this kernel's logic read as Triton (tests/kernels/gluon_interpreter.py), and
benchmarks/check_scan_gpu.py checks the kernel itself against the float64 reference on the GPU; fast_path.py runs it
only where that check has run.
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
    candidate,
    load_columns,
    load_gate,
    load_rows,
    operand_k,
    program_block,
    transposed_a_operand,
    transposed_b_operand,
)
from .triton_building_blocks import (
    checkpoint_slot_shift,
    chunk_bounds,
    input_gate,
    prefetch_steps,
    segment_chunks,
    sequence_bounds,
)


@gluon.jit
def scan_backward_gluon_kernel(
    q_ptr, k_ptr, v_ptr, W_ptr, f_ptr, cu_seqlens_ptr, checkpoint_ptr, dy_ptr,
    dstate_ptr, dq_ptr, dk_ptr, dv_ptr, df_ptr, dW_ptr, scratch_ptr,
    seq_len, num_slots, clip, segment_start, segment_end, segment_steps, row_block_steps,
    N: gl.constexpr, NQ: gl.constexpr, NK: gl.constexpr, NV: gl.constexpr, NF: gl.constexpr, NW: gl.constexpr,
    K: gl.constexpr, V: gl.constexpr, BK: gl.constexpr, BV: gl.constexpr, HP: gl.constexpr, BR: gl.constexpr,
    CHUNK: gl.constexpr, VARLEN: gl.constexpr, CLIP: gl.constexpr, DOT_DTYPE: gl.constexpr,
    DOT_PRECISION: gl.constexpr, GRAD_DTYPE: gl.constexpr, GRAD_PRECISION: gl.constexpr, FAST_TANH: gl.constexpr,
    LANE_SUMS: gl.constexpr, PREFETCH: gl.constexpr,
):
    # The twin's arguments, so that one launch serves both kernels. DOT_PRECISION, GRAD_PRECISION and LANE_SUMS go
    # unused: the products here are 16-bit tensor-core products, and no sum crosses lanes by shuffles but df's.
    gl.static_assert(HP == 1, "one head per program")
    ROWS_MASKED: gl.constexpr = K % BR != 0
    COLUMNS_MASKED: gl.constexpr = V != BV

    state_row, head, rows_block, rk, rv = program_block(BR, BV)
    num_row_blocks = gl.num_programs(2)
    rows = gl.expand_dims(rk, 1)
    columns = gl.expand_dims(rv, 0)
    batch, start, end = sequence_bounds(cu_seqlens_ptr, state_row, seq_len, VARLEN)

    # W (B operand of H·W, in the dot dtype) and Wᵀ (B operand of dA·Wᵀ, in the gradient dtype), zero-padded.
    W_rows = gl.expand_dims(gl.arange(0, BV, layout=ROWS), 1)
    W_offsets = (head // (N // NW)) * V * V + W_rows * V + columns
    W_mask = (W_rows < V) & (columns < V)
    W = gl.load(W_ptr + W_offsets, mask=W_mask, other=0.0)
    W_dot = gl.convert_layout(W.to(DOT_DTYPE), B_OPERAND)
    W_t = gl.convert_layout(gl.permute(W, (1, 0)).to(GRAD_DTYPE), B_OPERAND)

    state_mask = (rows < K) & (columns < V)
    dstate_offsets = (state_row.to(gl.int64) * N + head) * K * V + rows * V + columns
    dH = gl.load(dstate_ptr + dstate_offsets, mask=state_mask, other=0.0)
    dW = gl.zeros([BV, BV], gl.float32, ACCUMULATOR)

    slot = (batch * N + head).to(gl.int64) * num_slots + checkpoint_slot_shift(state_row, VARLEN)
    checkpoint_offsets = (slot * BK + rows) * BV + columns  # chunk 0's checkpoint
    # This program's scratch: per step of the chunk in flight, H_{t-1} in the dot dtype, (CHUNK, BR, BV), each element
    # stored and loaded by the same thread.
    program = (state_row * N + head) * num_row_blocks + rows_block
    scratch_base = scratch_ptr + program.to(gl.int64) * CHUNK * BR * BV
    block_offsets = _lane_major_offsets(gl.zeros([BR, BV], DOT_DTYPE, ACCUMULATOR), BR, BV)
    dv_partial_ptr = dv_ptr + rows_block.to(gl.int64) * row_block_steps * N * V + head * V
    df_partial_ptr = df_ptr + rows_block.to(gl.int64) * row_block_steps * N + head
    partial_rows = head * K + rk  # of dq, dk in a (…, N, K) partial row

    # What the steps read and where they write (see _replay_step and _walk_step).
    rk_operand = rows_block * BR + operand_k(BR, A_OPERAND)  # the program's rows along an A operand's k
    inputs = (q_ptr, k_ptr, v_ptr, dy_ptr, f_ptr)
    place = (batch, seq_len, head, rk, rk_operand, rv)  # the program's rows and columns in the inputs
    outputs = (dq_ptr, dk_ptr, dv_partial_ptr, df_partial_ptr, partial_rows, segment_start, segment_steps)
    scratch = (scratch_base, block_offsets)

    # Phase p walks chunk last - p + 1 (p > 0) and replays chunk last - p (p < num_chunks), the two step by step
    # together: their chains are independent, so each fills the other's waits. They meet at the boundary between the
    # two chunks; the walk's step boundary + i and the replay's step boundary - 1 - i share a scratch slot
    # (_scratch_slot), which the walk reads (a step ahead) before the replay writes it.
    first_chunk, num_chunks = segment_chunks(start, end, segment_start, segment_end, CHUNK)
    for phase in range(gl.where(num_chunks > 0, num_chunks + 1, 0)):
        boundary = (first_chunk + num_chunks - phase) * CHUNK
        walk_start, walk_end = chunk_bounds(first_chunk + num_chunks - phase, start, end, CHUNK)
        replay_start, replay_end = chunk_bounds(first_chunk + num_chunks - phase - 1, start, end, CHUNK)
        walk_start = gl.where(phase > 0, walk_start, boundary)  # none: [boundary, boundary)
        walk_end = gl.where(phase > 0, walk_end, boundary)
        replay_start = gl.where(phase < num_chunks, replay_start, boundary)
        replay_end = gl.where(phase < num_chunks, replay_end, boundary)
        if PREFETCH:
            # Into L2 the chunk the next phase replays, into L1 the one this phase replays and the next walks.
            steps = gl.arange(0, CHUNK, layout=STEPS)
            if replay_start > start:
                prefetch_steps(q_ptr, k_ptr, v_ptr, f_ptr, dy_ptr, batch, gl.maximum(start, replay_start - CHUNK),
                               replay_start, seq_len, head, rows_block * BR, steps, N, NQ, NK, NV, NF, K, V, True,
                               False)
            if replay_start < replay_end:
                prefetch_steps(q_ptr, k_ptr, v_ptr, f_ptr, dy_ptr, batch, replay_start, replay_end, seq_len, head,
                               rows_block * BR, steps, N, NQ, NK, NV, NF, K, V, True, True)

        # Each one's state at its first step; a phase without one loads it at a step clamped into the sequence and
        # never uses it.
        replay_chunk = gl.maximum(first_chunk + num_chunks - phase - 1, first_chunk)
        H = gl.load(checkpoint_ptr + checkpoint_offsets + replay_chunk * BK * BV, mask=state_mask, other=0.0)
        replay = (H.to(gl.float32),) + _replay_inputs(
            gl.maximum(gl.minimum(replay_start, end - 1), start), inputs, place, N, NK, NV, NF, K, V, BV,
            ROWS_MASKED, COLUMNS_MASKED) + (replay_start,)
        walk = (dH, dW, gl.load(_scratch_slot(walk_end - 1, scratch, BR, BV, CHUNK))) + _walk_inputs(
            gl.maximum(gl.minimum(walk_end - 1, end - 1), start), inputs, place, N, NQ, NK, NV, NF, K, V, BV,
            ROWS_MASKED, COLUMNS_MASKED) + (walk_end - 1,)

        # The replay's steps whose partners would come after the walk's chunk, the walk's whose partners would come
        # before the replay's, then the two together.
        mirror = 2 * boundary - 1
        for _ in range(replay_start, gl.minimum(replay_end, mirror + 1 - walk_end)):
            replay = _replay_step(replay, replay_end, W_dot, inputs, place, outputs, scratch, N, NK, NV, NF, K, V,
                                  BR, BV, CHUNK, ROWS_MASKED, COLUMNS_MASKED, DOT_DTYPE, GRAD_DTYPE, FAST_TANH)
        for _ in range(walk_end - gl.maximum(walk_start, mirror + 1 - replay_start)):
            walk = _walk_step(walk, walk_start, W_dot, W_t, clip, inputs, place, outputs, scratch, N, NQ, NK, NV,
                              NF, K, V, BR, BV, CHUNK, ROWS_MASKED, COLUMNS_MASKED, CLIP, GRAD_DTYPE, FAST_TANH)
        for _ in range(gl.minimum(walk_end, mirror + 1 - replay_start) - walk_start):
            walk = _walk_step(walk, walk_start, W_dot, W_t, clip, inputs, place, outputs, scratch, N, NQ, NK, NV,
                              NF, K, V, BR, BV, CHUNK, ROWS_MASKED, COLUMNS_MASKED, CLIP, GRAD_DTYPE, FAST_TANH)
            replay = _replay_step(replay, replay_end, W_dot, inputs, place, outputs, scratch, N, NK, NV, NF, K, V,
                                  BR, BV, CHUNK, ROWS_MASKED, COLUMNS_MASKED, DOT_DTYPE, GRAD_DTYPE, FAST_TANH)
        dH = walk[0]
        dW = walk[1]

    gl.store(dstate_ptr + dstate_offsets, dH, mask=state_mask)
    dW_rows = gl.expand_dims(gl.arange(0, BV, layout=ROWS), 1)
    dW_block = (dW_ptr + (state_row * num_row_blocks + rows_block).to(gl.int64) * N * V * V + head * V * V
                + dW_rows * V + columns)
    dW_mask = (dW_rows < V) & (columns < V)
    gl.store(dW_block, gl.load(dW_block, mask=dW_mask) + dW, mask=dW_mask)


@gluon.jit
def _replay_step(replay, replay_end, W_dot, inputs, place, outputs, scratch, N: gl.constexpr, NK: gl.constexpr,
                 NV: gl.constexpr, NF: gl.constexpr, K: gl.constexpr, V: gl.constexpr, BR: gl.constexpr,
                 BV: gl.constexpr, CHUNK: gl.constexpr, ROWS_MASKED: gl.constexpr, COLUMNS_MASKED: gl.constexpr,
                 DOT_DTYPE: gl.constexpr, GRAD_DTYPE: gl.constexpr, FAST_TANH: gl.constexpr):
    """The replay's step t, from its state (H_{t-1}, k_t, v_t, f_t, dy_t, t): keeps H_{t-1} in t's scratch slot and
    writes dq_t = H_t dy_t. Returns the state at step t + 1 (with step t's inputs again at the replay's last step)."""
    H, k_t, v_t, f_t, dy_t, t = replay
    g_t = input_gate(f_t)
    inputs_next = _replay_inputs(gl.minimum(t + 1, replay_end - 1), inputs, place, N, NK, NV, NF, K, V, BV,
                                 ROWS_MASKED, COLUMNS_MASKED)
    H_dot = H.to(DOT_DTYPE)
    gl.store(_scratch_slot(t, scratch, BR, BV, CHUNK), _lane_major(H_dot, BR, BV))
    Z = candidate(H_dot, W_dot, k_t, v_t, FAST_TANH)
    H = H + g_t * (Z - H)
    # dq_t = H_t dy_t as a tensor-core product with dy_t in every column of the B operand.
    dq_t = _row_sums_by_mma(gl.convert_layout(H.to(GRAD_DTYPE), A_OPERAND), dy_t.to(GRAD_DTYPE), BR, BV)
    dq_ptr, _dk_ptr, _dv_ptr, _df_ptr, partial_rows, segment_start, segment_steps = outputs
    batch, _seq_len, _head, rk, _rk_operand, _rv = place
    row = (batch * segment_steps + t - segment_start).to(gl.int64)
    _store_rows(dq_ptr + row * N * K + partial_rows, dq_t, rk < K, BR)
    return (H,) + inputs_next + (t + 1,)


@gluon.jit
def _walk_step(walk, walk_start, W_dot, W_t, clip, inputs, place, outputs, scratch, N: gl.constexpr,
               NQ: gl.constexpr, NK: gl.constexpr, NV: gl.constexpr, NF: gl.constexpr, K: gl.constexpr,
               V: gl.constexpr, BR: gl.constexpr, BV: gl.constexpr, CHUNK: gl.constexpr, ROWS_MASKED: gl.constexpr,
               COLUMNS_MASKED: gl.constexpr, CLIP: gl.constexpr, GRAD_DTYPE: gl.constexpr, FAST_TANH: gl.constexpr):
    """The walk's step t, from its state (dH, dW, H_{t-1} lane-major, then _walk_inputs of t, then t), dH the
    gradient reaching H_t from H_{t+1}: writes dk_t and this row block's dv_t and df_t, adds to dW. Returns the state
    at step t - 1 (with step t's H_{t-1} and inputs again at the walk's last step)."""
    dH, dW, H_prev, q_t, k_t, k_operand_t, v_t, v_operand_t, dy_t, f_t, t = walk
    g = input_gate(f_t)
    H_prev_dot = _from_lane_major(H_prev, BR, BV)
    t_prev = gl.maximum(t - 1, walk_start)
    inputs_prev = _walk_inputs(t_prev, inputs, place, N, NQ, NK, NV, NF, K, V, BV, ROWS_MASKED, COLUMNS_MASKED)
    H_prev_prev = gl.load(_scratch_slot(t_prev, scratch, BR, BV, CHUNK))

    Z = candidate(H_prev_dot, W_dot, k_t, v_t, FAST_TANH)
    H_prev32 = H_prev_dot.to(gl.float32)

    G = dH + gl.expand_dims(q_t, 1) * gl.expand_dims(dy_t, 0)
    if CLIP:
        G = gl.minimum(gl.maximum(G, -clip), clip)
    gG = g * G
    dA = gG * (1.0 - Z * Z)
    dA_grad = dA.to(GRAD_DTYPE)
    dA_a = gl.convert_layout(dA_grad, A_OPERAND)
    dH = mma_v2(dA_a, W_t, G - gG)
    # dk_t = dA v_t; dW += H_{t-1}ᵀ dA and dv_t = dAᵀ k_t = k_tᵀ dA with dA as the B operand.
    _dq_ptr, dk_ptr, dv_ptr, df_ptr, partial_rows, segment_start, segment_steps = outputs
    batch, _seq_len, _head, rk, _rk_operand, rv = place
    row = (batch * segment_steps + t - segment_start).to(gl.int64)
    dk_t = _row_sums_by_mma(dA_a, v_operand_t.to(GRAD_DTYPE), BR, BV)
    _store_rows(dk_ptr + row * N * K + partial_rows, dk_t, rk < K, BR)
    dA_b = transposed_b_operand(dA_grad, BR, BV)
    dW = mma_v2(transposed_a_operand(H_prev32.to(GRAD_DTYPE), BR, BV), dA_b, dW)
    k_rows = gl.expand_dims(k_operand_t.to(GRAD_DTYPE), 0).broadcast_to(16, BR)
    dv_t = mma_v2(k_rows, dA_b, gl.zeros([16, BV], gl.float32, ACCUMULATOR))  # (16, BV), every row dv_t
    dv_rows = gl.expand_dims(gl.arange(0, 16, layout=ROWS), 1)
    columns = gl.expand_dims(rv, 0)
    gl.store(dv_ptr + row * N * V + dv_rows * 0 + columns, dv_t.to(dv_ptr.dtype.element_ty),
             mask=(dv_rows == 0) & (columns < V))
    df_t = gl.sum(gl.sum(G * (H_prev32 - Z), axis=1), axis=0)
    gl.store(df_ptr + row * N, df_t)
    return (dH, dW, H_prev_prev) + inputs_prev + (t - 1,)


@gluon.jit
def _scratch_slot(t, scratch, BR: gl.constexpr, BV: gl.constexpr, CHUNK: gl.constexpr):
    """Where step t's H_{t-1} sits in the program's scratch (lane-major, see _lane_major): at slot t mod CHUNK,
    counted from the chunk's end in odd chunks of the time axis, so that step boundary + i of one chunk and step
    boundary - 1 - i of the chunk before share a slot."""
    scratch_base, block_offsets = scratch
    slot = (t % CHUNK) ^ ((t // CHUNK) % 2 * (CHUNK - 1))
    return scratch_base + slot * BR * BV + block_offsets


@gluon.jit
def _replay_inputs(t, inputs, place, N: gl.constexpr, NK: gl.constexpr, NV: gl.constexpr, NF: gl.constexpr,
                   K: gl.constexpr, V: gl.constexpr, BV: gl.constexpr, ROWS_MASKED: gl.constexpr,
                   COLUMNS_MASKED: gl.constexpr):
    """What the replay's step t reads: k_t (BR,) and v_t (BV,) in the state's row and column slices and f_t, float32;
    dy_t along a B operand's contraction (dq_t = H_t dy_t), in the input dtype."""
    _q_ptr, k_ptr, v_ptr, dy_ptr, f_ptr = inputs
    batch, seq_len, head, rk, _rk_operand, rv = place
    return (load_rows(k_ptr, batch, t, seq_len, head, rk, N, NK, K, ROWS_MASKED).to(gl.float32),
            load_columns(v_ptr, batch, t, seq_len, head, rv, N, NV, V, COLUMNS_MASKED).to(gl.float32),
            load_gate(f_ptr, batch, t, seq_len, head, N, NF),
            load_columns(dy_ptr, batch, t, seq_len, head, operand_k(BV, B_OPERAND), N, N, V, COLUMNS_MASKED))


@gluon.jit
def _walk_inputs(t, inputs, place, N: gl.constexpr, NQ: gl.constexpr, NK: gl.constexpr, NV: gl.constexpr,
                 NF: gl.constexpr, K: gl.constexpr, V: gl.constexpr, BV: gl.constexpr, ROWS_MASKED: gl.constexpr,
                 COLUMNS_MASKED: gl.constexpr):
    """What the walk's step t reads: q_t, k_t (BR,) and v_t, dy_t (BV,) in the state's row and column slices, float32
    (for Z_t and G); k_t along an A operand's contraction (dv_t = k_tᵀ dA) and v_t along a B operand's (dk_t = dA v_t),
    16-bit; and f_t."""
    q_ptr, k_ptr, v_ptr, dy_ptr, f_ptr = inputs
    batch, seq_len, head, rk, rk_operand, rv = place
    return (load_rows(q_ptr, batch, t, seq_len, head, rk, N, NQ, K, ROWS_MASKED).to(gl.float32),
            load_rows(k_ptr, batch, t, seq_len, head, rk, N, NK, K, ROWS_MASKED).to(gl.float32),
            load_rows(k_ptr, batch, t, seq_len, head, rk_operand, N, NK, K, ROWS_MASKED),
            load_columns(v_ptr, batch, t, seq_len, head, rv, N, NV, V, COLUMNS_MASKED).to(gl.float32),
            load_columns(v_ptr, batch, t, seq_len, head, operand_k(BV, B_OPERAND), N, NV, V, COLUMNS_MASKED),
            load_columns(dy_ptr, batch, t, seq_len, head, rv, N, N, V, COLUMNS_MASKED).to(gl.float32),
            load_gate(f_ptr, batch, t, seq_len, head, N, NF))


@gluon.jit
def _lane_major(x, BR: gl.constexpr, BV: gl.constexpr):
    """x (BR, BV) in the accumulator layout renamed, without moving, as (8, 4, BR · BV / 32): [g, j, i] is register i
    of lane 4g + j. Stored at _lane_major_offsets, each thread's elements are contiguous, in 16-byte stores."""
    # (BR // 16 m, 2 h, 8 g, BV // 8 a, 4 j, 2 e): row 16m + 8h + g, column 8a + 2j + e; registers run over e, h, a, m.
    x = gl.reshape(x, (BR // 16, 2, 8, BV // 8, 4, 2))
    return gl.reshape(gl.permute(x, (2, 4, 0, 3, 1, 5)), (8, 4, BR * BV // 32))


@gluon.jit
def _from_lane_major(x, BR: gl.constexpr, BV: gl.constexpr):
    """The inverse of _lane_major: (BR, BV) in the accumulator layout."""
    x = gl.permute(gl.reshape(x, (8, 4, BR // 16, BV // 8, 2, 2)), (2, 4, 0, 3, 1, 5))
    return gl.convert_layout(gl.reshape(x, (BR, BV)), ACCUMULATOR, assert_trivial=True)


@gluon.jit
def _lane_major_offsets(like, BR: gl.constexpr, BV: gl.constexpr):
    """Offsets (8, 4, BR · BV / 32) of a dense block in _lane_major's layout (`like`: any (BR, BV) tensor in the
    accumulator layout): lane 4g + j's elements at [(4g + j) · BR · BV / 32, …), in register order."""
    layout: gl.constexpr = _lane_major(like, BR, BV).type.layout
    g = gl.arange(0, 8, layout=gl.SliceLayout(1, gl.SliceLayout(2, layout)))
    j = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, layout)))
    i = gl.arange(0, BR * BV // 32, layout=gl.SliceLayout(0, gl.SliceLayout(1, layout)))
    lanes = gl.expand_dims(gl.expand_dims(g, 1), 2) * 4 + gl.expand_dims(gl.expand_dims(j, 0), 2)
    return lanes * (BR * BV // 32) + gl.expand_dims(gl.expand_dims(i, 0), 1)


@gluon.jit
def _row_sums_by_mma(x_a, column, BR: gl.constexpr, BV: gl.constexpr):
    """x_a (BR, BV) as an A operand times `column` (BV,), given along the B operand's contraction dim, on the tensor
    cores: (BR, 8), every column x·column."""
    columns = gl.expand_dims(column, 1).broadcast_to(BV, 8)
    return mma_v2(x_a, columns, gl.zeros([BR, 8], gl.float32, ACCUMULATOR))


@gluon.jit
def _store_rows(pointers, x, mask, BR: gl.constexpr):
    """Stores column 0 of x (BR, 8) in the accumulator layout at pointers (BR,) where mask, in the pointers' dtype."""
    column = gl.expand_dims(gl.arange(0, 8, layout=gl.SliceLayout(0, x.type.layout)), 0)
    gl.store(gl.expand_dims(pointers, 1) + column * 0, x.to(pointers.dtype.element_ty),
             mask=gl.expand_dims(mask, 1) & (column == 0))


