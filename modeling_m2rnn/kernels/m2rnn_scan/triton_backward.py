"""Backward scan kernel: walks the chunks backwards, recomputing each chunk's states from its
forward checkpoint, so no full state history is ever stored. One launch covers one segment of whole
chunks of the time axis (the caller launches the segments from the last to the first), so that the
per-program partials of dq and dk need only a segment's worth of memory; the gradient reaching the
state crosses from one launch to the next through `dstate`.

Per step t, with G the whole gradient reaching H_t (from y_t and from H_{t+1}), clamped to
[-c, c] when gradient clipping is on (docs/design.md, "The recurrence"):
    dZ = (1 - f) G;  dA = dZ ⊙ (1 - Z²)                 A = H_{t-1} W + k vᵀ,  Z = tanh(A)
    dH_{t-1} = f G + dA Wᵀ;  dW += H_{t-1}ᵀ dA;  dk = dA v;  dv = dAᵀ k
    df = Σ G ⊙ (H_{t-1} - Z);  dq = H_t dy
Every quantity but dv, df and dW is local to a row of H, so a program carries BR rows of HP heads
as in the forward. Heads that share q and k (Nq, Nk < N) would collide on the same dq, dk rows:
each program sums its HP heads in registers and writes one float32 partial row per program, and
PyTorch sums the partials of a group after each segment (no atomics). dv, df and dW sum over rows:
one partial per head and row block. The initial state's gradient is row-local.
"""

import triton
import triton.language as tl

from .triton_building_blocks import (
    blend,
    candidate,
    checkpoint_offsets,
    checkpoint_slot_shift,
    chunk_bounds,
    head_rows_offsets,
    input_gate,
    load_masked,
    load_step,
    load_weights,
    padded_block_offsets,
    prefetch_steps,
    row_block,
    segment_chunks,
    sequence_bounds,
    store_column_sums,
    store_row_sums,
    value_row_offsets,
)


@triton.jit
def load_output_grad(dy_ptr, batch, t, seq_len, heads, rv, N: tl.constexpr, V: tl.constexpr, UNPAIRED: tl.constexpr):
    """dy_t (HP, BV) in float32 from dy (B, S, N, V); t a step of the sequence, UNPAIRED as in load_step."""
    row = (batch * seq_len + t).to(tl.int64)
    offsets = value_row_offsets(row * N + heads[:, None], rv, V, UNPAIRED)
    return load_masked(dy_ptr + offsets, rv[None, :] < V, tl.constexpr(V) != rv.shape[0]).to(tl.float32)


@triton.jit
def scan_backward_kernel(
    q_ptr, k_ptr, v_ptr, W_ptr, f_ptr, cu_seqlens_ptr, checkpoint_ptr, dy_ptr,  # inputs
    # dstate (states, N, K, V) f32: in, the gradient reaching the state at segment_end; out, at segment_start.
    # Outputs for the steps from segment_start: dq, dk partials (B, segment_steps, N / HP, K), dv
    # (R, B, segment_steps, N, V), df (R, B, segment_steps, N) f32; dW (states, R, N, V, V) f32, accumulated.
    # scratch (programs, CHUNK, HP, BR, BV)
    dstate_ptr, dq_ptr, dk_ptr, dv_ptr, df_ptr, dW_ptr, scratch_ptr,
    # row_block_steps = B * segment_steps, the stride of a row block's dv, df partials.
    seq_len, num_slots, clip, segment_start, segment_end, segment_steps, row_block_steps,
    N: tl.constexpr, NQ: tl.constexpr, NK: tl.constexpr, NV: tl.constexpr, NF: tl.constexpr, NW: tl.constexpr,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HP: tl.constexpr, BR: tl.constexpr,
    CHUNK: tl.constexpr, VARLEN: tl.constexpr, CLIP: tl.constexpr, DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, GRAD_DTYPE: tl.constexpr, GRAD_PRECISION: tl.constexpr, FAST_TANH: tl.constexpr,
    LANE_SUMS: tl.constexpr, PREFETCH: tl.constexpr,
):
    state_row = tl.program_id(0)
    head_block = tl.program_id(1)
    heads = head_block * HP + tl.arange(0, HP)  # (HP,)
    rows_block = tl.program_id(2)
    num_row_blocks = tl.num_programs(2)
    rk = row_block(BR)  # (BR,)
    rv = tl.arange(0, BV)
    batch, start, end = sequence_bounds(cu_seqlens_ptr, state_row, seq_len, VARLEN)

    W = load_weights(W_ptr, heads, rv, N, NW, V)  # (HP, BV, BV) float32
    W_dot = W.to(DOT_DTYPE)
    W_t = tl.permute(W, (0, 2, 1)).to(GRAD_DTYPE)
    state_offsets, state_mask = head_rows_offsets(heads, rk, rv, K, V)
    dstate_offsets = state_row.to(tl.int64) * N * K * V + state_offsets
    dH = tl.load(dstate_ptr + dstate_offsets, mask=state_mask, other=0.0)
    dW = tl.zeros((HP, BV, BV), dtype=tl.float32)

    checkpoint_offs = checkpoint_offsets(batch, heads, rk, checkpoint_slot_shift(state_row, VARLEN), num_slots,
                                         N, BK, BV)  # chunk 0's slot
    # This program's scratch: the CHUNK states H_{t-1} of the chunk in flight, (CHUNK, HP, BR, BV).
    program = (state_row * (N // HP) + head_block) * num_row_blocks + rows_block
    scratch_base = scratch_ptr + program.to(tl.int64) * CHUNK * HP * BR * BV
    block_offsets = padded_block_offsets(HP, BR, BV)
    # This row block's partials of dv and df: (B, segment_steps, N, V) and (B, segment_steps, N) slices.
    partial_rows = rows_block.to(tl.int64) * row_block_steps
    dv_partial_ptr = dv_ptr + partial_rows * N * V
    df_partial_ptr = df_ptr + partial_rows * N

    first_chunk, num_chunks = segment_chunks(start, end, segment_start, segment_end, CHUNK)
    for chunk_from_end in range(num_chunks):
        chunk = first_chunk + num_chunks - 1 - chunk_from_end
        chunk_start, chunk_end = chunk_bounds(chunk, start, end, CHUNK)

        if PREFETCH:
            # Into L2 the chunk before, which this program walks next; into L1 this chunk, whose rows the replay
            # and then the walk load.
            if chunk_start > start:
                prefetch_steps(q_ptr, k_ptr, v_ptr, f_ptr, dy_ptr, batch, tl.maximum(start, chunk_start - CHUNK),
                               chunk_start, seq_len, head_block * HP, rows_block * BR, tl.arange(0, CHUNK),
                               N, NQ, NK, NV, NF, K, V, True, False)
            prefetch_steps(q_ptr, k_ptr, v_ptr, f_ptr, dy_ptr, batch, chunk_start, chunk_end, seq_len,
                           head_block * HP, rows_block * BR, tl.arange(0, CHUNK), N, NQ, NK, NV, NF, K, V, True, True)
        # Replay the chunk forward from its checkpoint, keeping every H_{t-1} in the scratch
        # and writing dq_t = H_t dy_t while H_t is at hand.
        # Masked: rows past K in a part-filled block were never written when the forward split rows differently.
        H = tl.load(checkpoint_ptr + checkpoint_offs + chunk * BK * BV, mask=state_mask, other=0.0).to(tl.float32)
        # v and dy one element at a time: the replay's step is short enough to wait for them otherwise
        # (see load_step). The walk's step is long, so there pairs cost nothing and save instructions.
        _q, k_t, v_t, f_t = load_step(q_ptr, k_ptr, v_ptr, f_ptr, batch, chunk_start, seq_len, heads, rk, rv,
                                      N, NQ, NK, NV, NF, K, V, True)
        dy_t = load_output_grad(dy_ptr, batch, chunk_start, seq_len, heads, rv, N, V, True)
        for t in range(chunk_start, chunk_end):
            g_t = input_gate(f_t)
            t_next = tl.minimum(t + 1, chunk_end - 1)
            _q_next, k_next, v_next, f_next = load_step(q_ptr, k_ptr, v_ptr, f_ptr, batch, t_next, seq_len,
                                                        heads, rk, rv, N, NQ, NK, NV, NF, K, V, True)
            dy_next = load_output_grad(dy_ptr, batch, t_next, seq_len, heads, rv, N, V, True)
            H_dot = H.to(DOT_DTYPE)
            tl.store(scratch_base + (t - chunk_start) * HP * BR * BV + block_offsets, H_dot)
            H = blend(H, candidate(H_dot, W_dot, k_t, v_t, DOT_PRECISION, FAST_TANH), g_t)
            dq_row = dq_ptr + _partial_row(batch, t, segment_start, segment_steps, N, HP, K)
            store_row_sums(dq_row, H * dy_t[:, None, :], head_block, HP, BR, BV, K, LANE_SUMS)
            k_t, v_t, f_t, dy_t = k_next, v_next, f_next, dy_next
        # Global writes of one thread become visible to the others at a barrier.
        tl.debug_barrier()

        # Walk the chunk backwards.
        t = chunk_end - 1
        q_t, k_t, v_t, f_t = load_step(q_ptr, k_ptr, v_ptr, f_ptr, batch, t, seq_len, heads, rk, rv,
                                       N, NQ, NK, NV, NF, K, V, False)
        dy_t = load_output_grad(dy_ptr, batch, t, seq_len, heads, rv, N, V, False)
        H_prev = tl.load(scratch_base + (t - chunk_start) * HP * BR * BV + block_offsets)
        for _step in range(chunk_end - chunk_start):
            # First, what the step needs of the values prefetched in the step before (see input_gate).
            H_prev32 = H_prev.to(tl.float32)
            g = input_gate(f_t)[:, None, None]
            t_prev = tl.maximum(t - 1, chunk_start)
            q_prev, k_prev, v_prev, f_prev = load_step(q_ptr, k_ptr, v_ptr, f_ptr, batch, t_prev, seq_len,
                                                       heads, rk, rv, N, NQ, NK, NV, NF, K, V, False)
            dy_prev = load_output_grad(dy_ptr, batch, t_prev, seq_len, heads, rv, N, V, False)
            # At the chunk's first step this reloads its own slot: in bounds, and never used.
            prev_slot = tl.maximum(t - 1 - chunk_start, 0)
            H_prev_prev = tl.load(scratch_base + prev_slot * HP * BR * BV + block_offsets)

            Z = candidate(H_prev32.to(DOT_DTYPE), W_dot, k_t, v_t, DOT_PRECISION, FAST_TANH)
            G = dH + q_t[:, :, None] * dy_t[:, None, :]
            if CLIP:
                G = tl.minimum(tl.maximum(G, -clip), clip)
            dA = g * G * (1.0 - Z * Z)
            dA_dot = dA.to(GRAD_DTYPE)
            dH = (G - g * G) + tl.dot(dA_dot, W_t, input_precision=GRAD_PRECISION)
            dW += tl.dot(tl.permute(H_prev32.to(GRAD_DTYPE), (0, 2, 1)), dA_dot, input_precision=GRAD_PRECISION)

            dk_row = dk_ptr + _partial_row(batch, t, segment_start, segment_steps, N, HP, K)
            store_row_sums(dk_row, dA * v_t[:, None, :], head_block, HP, BR, BV, K, LANE_SUMS)
            row = (batch * segment_steps + t - segment_start).to(tl.int64)
            # This row block's part of dv_t
            store_column_sums(dv_partial_ptr + row * N * V, dA * k_t[:, :, None], heads, True, HP, BR, BV, V,
                              LANE_SUMS)
            df_t = tl.sum(tl.sum(G * (H_prev32 - Z), axis=2), axis=1)  # (HP,), this row block's part
            tl.store(df_partial_ptr + row * N + heads, df_t)

            t -= 1
            q_t, k_t, v_t, f_t, dy_t, H_prev = q_prev, k_prev, v_prev, f_prev, dy_prev, H_prev_prev
        # The next chunk's replay overwrites the scratch this chunk's threads just read.
        tl.debug_barrier()

    tl.store(dstate_ptr + dstate_offsets, dH, mask=state_mask)
    dW_offsets = (heads[:, None, None] * V + rv[None, :, None]) * V + rv[None, None, :]
    dW_mask = (rv[None, :, None] < V) & (rv[None, None, :] < V)
    dW_block = dW_ptr + (state_row * num_row_blocks + rows_block).to(tl.int64) * N * V * V + dW_offsets
    tl.store(dW_block, tl.load(dW_block, mask=dW_mask) + dW, mask=dW_mask)


@triton.jit
def _partial_row(batch, t, segment_start, segment_steps, N: tl.constexpr, HP: tl.constexpr, K: tl.constexpr):
    """Offset of step t's row in a (B, segment_steps, N // HP, K) partial of dq or dk."""
    return (batch * segment_steps + t - segment_start).to(tl.int64) * (N // HP) * K
