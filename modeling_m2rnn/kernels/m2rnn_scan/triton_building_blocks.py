"""Triton building blocks shared by the forward and backward scan kernels.

Row i of a head's state evolves on its own: H_t[i,:] = f H_{t-1}[i,:] + (1-f) tanh(H_{t-1}[i,:] W +
k_t[i] v_t). So every kernel runs one program per (state row, block of HP consecutive heads, block
of BR state rows) and holds its slice of the state as one float32 register tensor of shape
(HP, BR, BV); only y, dv, df and dW sum over rows, and they are written as one partial per row
block. BK and BV are K and V rounded up to powers of two (at least 16, the smallest tensor-core
tile), BR a power of two (at least 16) dividing BK; the padding rows and columns are zero and stay
zero through the recurrence, because the padded parts of W, k, v and q are loaded as zeros.

Tensors are contiguous; the offsets below spell out their layouts.
"""

import triton
import triton.language as tl


@triton.jit
def tanh(x, FAST: tl.constexpr):
    """tanh in float32. FAST: one tanh.approx.f32 per element on the GPU (max rel. error ~2^-11,
    for 16-bit inputs); the special-function unit's throughput sets the pace of a step, and the
    exp-and-divide form takes about twice as long. The portable form is exact to float32 rounding and
    runs in the Triton interpreter. (tanh.approx.f16x2, two per instruction, is no faster and less
    accurate.)"""
    if FAST:
        return tl.inline_asm_elementwise(
            "tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        # exp of a non-positive number: never overflows.
        e = tl.exp(-2.0 * tl.abs(x))
        t = (1.0 - e) / (1.0 + e)
        return tl.where(x < 0, -t, t)


@triton.jit
def sequence_bounds(cu_seqlens_ptr, state_row, seq_len, VARLEN: tl.constexpr):
    """(batch row, first step, end step) of the sequence whose state is `state_row`."""
    if VARLEN:
        start = tl.load(cu_seqlens_ptr + state_row).to(tl.int32)
        end = tl.load(cu_seqlens_ptr + state_row + 1).to(tl.int32)
        return 0, start, end
    else:
        return state_row, 0, seq_len


@triton.jit
def checkpoint_slot_shift(state_row, VARLEN: tl.constexpr):
    """Checkpoint chunks are aligned to the time axis: chunk c covers steps [c·CHUNK, (c+1)·CHUNK) of
    the (packed) sequence dimension, and its checkpoint is the state before the sequence's first step
    in it. Sequence i keeps chunk c at slot c + i: a packed sequence's first chunk may share c with the
    previous sequence's last one, and the shift keeps them apart, so cdiv(S, CHUNK) + num_sequences
    slots hold every sequence without a host-side prefix sum. Aligned chunks let the backward walk the
    time axis in segments of whole chunks for packed and unpacked batches alike."""
    if VARLEN:
        return state_row
    else:
        return 0


@triton.jit
def chunk_bounds(chunk, start, end, CHUNK: tl.constexpr):
    """Steps [chunk_start, chunk_end) of the sequence [start, end) in chunk `chunk` of the time axis."""
    return tl.maximum(start, chunk * CHUNK), tl.minimum(end, chunk * CHUNK + CHUNK)


@triton.jit
def segment_chunks(start, end, segment_start, segment_end, CHUNK: tl.constexpr):
    """(first chunk, number of chunks) of the sequence [start, end) inside a backward segment [segment_start,
    segment_end), whose bounds are chunk bounds."""
    lo = tl.maximum(start, segment_start)
    hi = tl.minimum(end, segment_end)
    first_chunk = lo // CHUNK
    return first_chunk, (tl.cdiv(hi, CHUNK) - first_chunk) * (hi > lo).to(tl.int32)


@triton.jit
def load_step(
    q_ptr, k_ptr, v_ptr, f_ptr, batch, t, seq_len, heads, rk, rv,
    N: tl.constexpr, NQ: tl.constexpr, NK: tl.constexpr, NV: tl.constexpr, NF: tl.constexpr,
    K: tl.constexpr, V: tl.constexpr, UNPAIRED: tl.constexpr,
):
    """Step t's inputs for the program's heads and rows rk, in float32, zero where padded: q_t, k_t (HP, BR);
    v_t (HP, BV); f_t (HP,). Head n reads group n // (N / Nx) of an input; HP divides N.

    t must be a step of the sequence: a kernel loading ahead clamps t to its chunk (and never uses what it loaded
    at the clamp), so the loads need no per-step mask, and none at all where K and V fill their blocks.
    UNPAIRED: v is loaded one element at a time instead of two per 32-bit load. The next step's v, loaded in
    pairs, is unpacked into its loop-carried registers at the end of this step, so the step waits there for the
    load; loaded one by one, the wait moves to the use in the next step. It costs two more load instructions."""
    row = (batch * seq_len + t).to(tl.int64)
    rows_masked: tl.constexpr = tl.constexpr(K) % rk.shape[0] != 0
    columns_masked: tl.constexpr = tl.constexpr(V) != rv.shape[0]
    q_t = load_masked(q_ptr + ((row * NQ + heads[:, None] // (N // NQ)) * K + rk[None, :]), rk[None, :] < K,
                      rows_masked)
    k_t = load_masked(k_ptr + ((row * NK + heads[:, None] // (N // NK)) * K + rk[None, :]), rk[None, :] < K,
                      rows_masked)
    v_offsets = value_row_offsets(row * NV + heads[:, None] // (N // NV), rv, V, UNPAIRED)
    v_t = load_masked(v_ptr + v_offsets, rv[None, :] < V, columns_masked)
    f_t = tl.load(f_ptr + (row * NF + heads // (N // NF)))
    return q_t.to(tl.float32), k_t.to(tl.float32), v_t.to(tl.float32), f_t.to(tl.float32)


@triton.jit
def prefetch_steps(q_ptr, k_ptr, v_ptr, f_ptr, dy_ptr, batch, first, last, seq_len, head, row, steps,
                   N: tl.constexpr, NQ: tl.constexpr, NK: tl.constexpr, NV: tl.constexpr, NF: tl.constexpr,
                   K: tl.constexpr, V: tl.constexpr, WITH_DY: tl.constexpr, L1: tl.constexpr):
    """Ask L2 (or L1) for the rows that steps [first, last) (at least one, at most len(steps)) of head `head` and state
    rows from `row` will load: q_t, k_t, v_t, f_t and, WITH_DY, dy_t, one step per thread. `steps` is arange(0, STEPS)
    (in the caller's layout, for a Gluon kernel). GPU only (prefetch.global).

    A step loop prefetches each input one step ahead into registers; a load from device memory takes longer than a
    short step, and the step then waits for it (the profile's long-scoreboard stalls, benchmarks/profile_scan.py).
    Asked for a chunk ahead, the rows are in L2 by the time the loop loads them. Nothing waits for a prefetch; the
    threads past `last` ask again for its last row."""
    t = tl.minimum(first + steps, last - 1)
    step_row = (batch * seq_len + t).to(tl.int64)
    _prefetch(q_ptr + (step_row * NQ + head // (N // NQ)) * K + row, L1)
    _prefetch(k_ptr + (step_row * NK + head // (N // NK)) * K + row, L1)
    _prefetch(v_ptr + (step_row * NV + head // (N // NV)) * V, L1)
    _prefetch(f_ptr + step_row * NF + head // (N // NF), L1)
    if WITH_DY:
        _prefetch(dy_ptr + (step_row * N + head) * V, L1)


@triton.jit
def _prefetch(pointers, L1: tl.constexpr):
    if L1:
        tl.inline_asm_elementwise("prefetch.global.L1 [$1];", "=r,l", [pointers], dtype=tl.int32, is_pure=False, pack=1)
    else:
        tl.inline_asm_elementwise("prefetch.global.L2 [$1];", "=r,l", [pointers], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def value_row_offsets(rows, rv, V: tl.constexpr, UNPAIRED: tl.constexpr):
    """Offsets (HP, BV) of columns rv in rows `rows` (HP, 1) of a tensor with rows of V values (v, dy). UNPAIRED
    (see load_step): hinted as one element per load. The hint goes on the expression itself: on a jit function's
    argument it would be lost."""
    offsets = rows * V + rv[None, :]
    if UNPAIRED:
        offsets = tl.max_contiguous(offsets, [1, 1])
    return offsets


@triton.jit
def load_masked(pointers, mask, MASKED: tl.constexpr):
    """tl.load, zero where not `mask` if MASKED (blocks of a shape that fills them take no mask)."""
    if MASKED:
        return tl.load(pointers, mask=mask, other=0.0)
    else:
        return tl.load(pointers)


@triton.jit
def row_block(BR: tl.constexpr):
    """The program's state rows (BR,): row block tl.program_id(2)."""
    return tl.program_id(2) * BR + tl.arange(0, BR)


@triton.jit
def head_rows_offsets(heads, rk, rv, K: tl.constexpr, V: tl.constexpr):
    """Offsets and mask of the (HP, BR, BV) block at rows rk of an (…, N, K, V) tensor, relative to head 0."""
    offsets = (heads[:, None, None] * K + rk[None, :, None]) * V + rv[None, None, :]
    mask = (rk[None, :, None] < K) & (rv[None, None, :] < V)
    return offsets, mask


@triton.jit
def padded_block_offsets(HP: tl.constexpr, BR: tl.constexpr, BV: tl.constexpr):
    """Offsets of a dense (HP, BR, BV) block (the backward's scratch states keep the padding)."""
    h = tl.arange(0, HP)[:, None, None]
    r = tl.arange(0, BR)[None, :, None]
    c = tl.arange(0, BV)[None, None, :]
    return (h * BR + r) * BV + c


@triton.jit
def checkpoint_offsets(batch, heads, rk, slot_shift, num_slots, N: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Offsets of the (HP, BR, BV) block at rows rk of chunk 0's checkpoint (slot `slot_shift`, see
    checkpoint_slot_shift; chunk c lies c · BK · BV further) in a buffer of shape (rows, N, num_slots,
    BK, BV), rows = B (1 when packed). Independent of HP and BR, so the forward and the backward may
    split heads and rows differently."""
    slots = (batch * N + heads[:, None, None]).to(tl.int64) * num_slots + slot_shift
    c = tl.arange(0, BV)[None, None, :]
    return (slots * BK + rk[None, :, None]) * BV + c


@triton.jit
def load_weights(W_ptr, heads, rv, N: tl.constexpr, NW: tl.constexpr, V: tl.constexpr):
    """W of each head as float32 (HP, BV, BV), zero-padded."""
    groups = heads[:, None, None] // (N // NW)
    offsets = (groups * V + rv[None, :, None]) * V + rv[None, None, :]
    mask = (rv[None, :, None] < V) & (rv[None, None, :] < V)
    return tl.load(W_ptr + offsets, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def candidate(H_dot, W_dot, k_t, v_t, DOT_PRECISION: tl.constexpr, FAST_TANH: tl.constexpr):
    """Z_t = tanh(H_{t-1} W + k_t v_tᵀ) for HP heads, float32 (HP, BR, BV).

    H_dot: H_{t-1} as the matmul operand (HP, BR, BV) in the dot dtype; W_dot (HP, BV, BV) likewise;
    k_t (HP, BR); v_t (HP, BV) float32."""
    A = tl.dot(H_dot, W_dot, input_precision=DOT_PRECISION) + k_t[:, :, None] * v_t[:, None, :]
    return tanh(A, FAST_TANH)


@triton.jit
def input_gate(f_t):
    """1 - f_t, the weight of Z_t in the blend. A step loop computes it first thing from the f_t it prefetched in
    the step before: that frees the register holding the prefetch, so the next prefetch can load into it. A step
    that read f_t only in the blend would copy the next prefetch into f_t's register at its end, and so wait for
    the load it had just issued (benchmarks/sass_report.py shows the loop's instructions)."""
    return 1.0 - f_t


@triton.jit
def blend(H, Z, g_t):
    """H_t = f_t H_{t-1} + (1 - f_t) Z_t = H_{t-1} + g_t (Z_t - H_{t-1}), g_t = input_gate(f_t);
    H, Z (HP, BR, BV), g_t (HP,)."""
    return H + g_t[:, None, None] * (Z - H)


# Row and column sums by hand. A state block (HP, BR, BV) on one warp sits in the tensor cores' accumulator
# layout: lane = 4g + j holds rows i·8 + g (i < BR / 8) and columns a·8 + 2j + e (a < BV / 8, e < 2). tl.sum
# sums every value it holds, then reduces across the lanes with one shuffle per value and lane bit. The sums
# below halve the values a lane carries at each lane bit instead (a reduce-scatter: send one half, keep the
# other), so after the last bit each lane holds distinct sums, which it stores itself: fewer shuffles and no
# shared-memory round trip to the store's layout. GPU only (inline assembly), for 16-bit tensor-core blocks
# on one warp (launched for one head per program, the case checked on the GPU); elsewhere the kernels use tl.sum.

@triton.jit
def _shuffle_xor(x, lane_bits):
    """x (float32) from the lane whose index differs from this lane's in `lane_bits` (int32, x's shape)."""
    return tl.inline_asm_elementwise("shfl.sync.bfly.b32 $0, $1, $2, 0x1f, 0xffffffff;", "=r,r,r", [x, lane_bits],
                                     dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _halve(first, second, keeps_second, LANE_BIT: tl.constexpr):
    """One reduce-scatter step over LANE_BIT: a lane keeps `second` where `keeps_second` (its LANE_BIT is set)
    and `first` elsewhere, sends the other to its partner, and adds what the partner sent."""
    send = tl.where(keeps_second, first, second)
    keep = tl.where(keeps_second, second, first)
    return keep + _shuffle_xor(send, tl.full(send.shape, LANE_BIT, tl.int32))


@triton.jit
def _column_sums(x, HP: tl.constexpr, BR: tl.constexpr, BV: tl.constexpr):
    """Σ over the rows of x (HP, BR, BV) as (HP, 8, BV // 16, 4): entry (h, g, b, j) holds column
    _column_sums_columns(...)[h, g, b, j] of head h; entries with g >= 4 repeat those with g - 4."""
    # (HP, 8 g, BV // 16, 2 a_low, 4 j, 2 e): each lane's own rows summed first
    x = tl.sum(tl.reshape(x, (HP, BR // 8, 8, BV // 16, 2, 4, 2)), axis=1)
    g = tl.arange(0, 8)[None, :, None, None, None]
    first, second = tl.split(tl.permute(x, (0, 1, 2, 4, 5, 3)))
    x = _halve(first, second, (g & 1) == 1, 4)  # lane bit 2 = g bit 0 keeps a_low
    first, second = tl.split(x)
    x = _halve(first, second, (tl.reshape(g, (1, 8, 1, 1)) & 2) == 2, 8)  # g bit 1 keeps e
    return x + _shuffle_xor(x, tl.full(x.shape, 16, tl.int32))


@triton.jit
def _column_sums_columns(HP: tl.constexpr, BV: tl.constexpr):
    """(HP, 8, BV // 16, 4) column of each entry of _column_sums, and the mask of the entries that own it."""
    g = tl.arange(0, 8)[None, :, None, None]
    b = tl.arange(0, BV // 16)[None, None, :, None]
    j = tl.arange(0, 4)[None, None, None, :]
    column = tl.broadcast_to(b * 16 + (g & 1) * 8 + 2 * j + (g >> 1 & 1), (HP, 8, BV // 16, 4))
    return column, g < 4


@triton.jit
def _row_sums(x, HP: tl.constexpr, BR: tl.constexpr, BV: tl.constexpr):
    """Σ over the heads and columns of x (HP, BR, BV), BR >= 32, as (BR // 32, 8, 4): entry (c, g, j) holds
    row c·32 + j·8 + g, every row once."""
    # (HP, BR // 32, 2 i_high, 2 i_low, 8 g, 4 j): each lane's own columns summed first
    x = tl.sum(tl.sum(tl.reshape(x, (HP, BR // 32, 2, 2, 8, BV // 8, 4, 2)), axis=7), axis=5)
    j = tl.arange(0, 4)[None, None, :, None]
    first, second = tl.split(tl.permute(tl.sum(x, axis=0), (0, 3, 4, 1, 2)))
    x = _halve(first, second, (j & 1) == 1, 1)  # lane bit 0 = j bit 0 keeps i_low
    first, second = tl.split(x)
    return _halve(first, second, (tl.reshape(j, (1, 1, 4)) & 2) == 2, 2)  # j bit 1 keeps i_high


@triton.jit
def _row_sums_rows(BR: tl.constexpr):
    """(BR // 32, 8, 4) row of each entry of _row_sums."""
    c = tl.arange(0, BR // 32)[:, None, None]
    g = tl.arange(0, 8)[None, :, None]
    j = tl.arange(0, 4)[None, None, :]
    return c * 32 + j * 8 + g


@triton.jit
def store_column_sums(row_ptr, x, heads, valid, HP: tl.constexpr, BR: tl.constexpr, BV: tl.constexpr,
                      V: tl.constexpr, LANE_SUMS: tl.constexpr):
    """Stores Σ over the rows of x (HP, BR, BV), the program's part of y_t or dv_t, in row_ptr's dtype into the
    (N, V) row at row_ptr (columns of `heads`), where `valid`."""
    if LANE_SUMS:
        columns, owned = _column_sums_columns(HP, BV)  # (HP, 8, BV // 16, 4)
        sums = _column_sums(x, HP, BR, BV)
        tl.store(row_ptr + heads[:, None, None, None] * V + columns, sums.to(row_ptr.dtype.element_ty),
                 mask=tl.where(valid, owned & (columns < V), False))
    else:
        columns = tl.arange(0, BV)[None, :]
        sums = tl.sum(x, axis=1)  # (HP, BV)
        tl.store(row_ptr + heads[:, None] * V + columns, sums.to(row_ptr.dtype.element_ty),
                 mask=tl.where(valid, columns < V, False))


@triton.jit
def store_row_sums(row_ptr, x, head_block, HP: tl.constexpr, BR: tl.constexpr, BV: tl.constexpr, K: tl.constexpr,
                   LANE_SUMS: tl.constexpr):
    """Stores Σ over the heads and columns of x (HP, BR, BV), the program's rows of a dq or dk partial, in the
    (…, N // HP, K) row at row_ptr."""
    if LANE_SUMS and BR >= 32:
        rows = tl.program_id(2) * BR + _row_sums_rows(BR)  # (BR // 32, 8, 4)
        tl.store(row_ptr + head_block * K + rows, _row_sums(x, HP, BR, BV), mask=rows < K)
    else:
        rows = row_block(BR)
        tl.store(row_ptr + head_block * K + rows, tl.sum(tl.sum(x, axis=2), axis=0), mask=rows < K)
