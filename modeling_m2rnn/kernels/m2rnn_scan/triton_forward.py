"""Forward scan kernel: the state stays in float32 registers for the whole sequence.

One program carries BR rows of the state of HP heads (see triton_building_blocks). It writes its row block's
partial of y (y_t = Σ_i q_t[i] H_t[i,:] sums over all rows; the caller sums the partials, off the
step chain), its rows of the final state and, when a backward pass will follow, of a checkpoint of
the state at the start of every chunk of CHUNK steps (the backward recomputes the states in between;
see checkpoint_slot_shift). The same kernel with one step and no checkpoints is the decode step.
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
    load_step,
    load_weights,
    prefetch_steps,
    row_block,
    sequence_bounds,
    store_column_sums,
)


@triton.jit
def scan_forward_kernel(
    q_ptr, k_ptr, v_ptr, W_ptr, f_ptr, h0_ptr, cu_seqlens_ptr,  # inputs (see m2rnn_scan)
    # y partials (R, B, S, N, V); h_final (states, N, K, V) f32; checkpoints: see checkpoint_offsets
    y_ptr, h_final_ptr, checkpoint_ptr,
    seq_len, num_slots, y_partial_stride,  # y_partial_stride = B * S * N * V, the stride of a row block's partial
    N: tl.constexpr, NQ: tl.constexpr, NK: tl.constexpr, NV: tl.constexpr, NF: tl.constexpr, NW: tl.constexpr,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HP: tl.constexpr, BR: tl.constexpr,
    CHUNK: tl.constexpr, HAS_H0: tl.constexpr, VARLEN: tl.constexpr, STORE_CHECKPOINTS: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, FAST_TANH: tl.constexpr, LANE_SUMS: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    state_row = tl.program_id(0)
    heads = tl.program_id(1) * HP + tl.arange(0, HP)  # (HP,)
    rk = row_block(BR)  # (BR,)
    rv = tl.arange(0, BV)
    batch, start, end = sequence_bounds(cu_seqlens_ptr, state_row, seq_len, VARLEN)

    W_dot = load_weights(W_ptr, heads, rv, N, NW, V).to(DOT_DTYPE)  # (HP, BV, BV)
    state_offsets, state_mask = head_rows_offsets(heads, rk, rv, K, V)
    state_base = state_row.to(tl.int64) * N * K * V
    if HAS_H0:
        H = tl.load(h0_ptr + state_base + state_offsets, mask=state_mask, other=0.0).to(tl.float32)
    else:
        H = tl.zeros((HP, BR, BV), dtype=tl.float32)

    checkpoint_offs = checkpoint_offsets(batch, heads, rk, checkpoint_slot_shift(state_row, VARLEN), num_slots,
                                         N, BK, BV)  # (HP, BR, BV), chunk 0's slot
    y_partial_ptr = y_ptr + tl.program_id(2).to(tl.int64) * y_partial_stride

    # The time axis in checkpoint chunks (see checkpoint_slot_shift), so that the checkpoint store sits outside
    # the step loop rather than behind a branch in every step.
    for chunk in range(start // CHUNK, tl.cdiv(end, CHUNK)):
        chunk_start, chunk_end = chunk_bounds(chunk, start, end, CHUNK)
        if PREFETCH:
            if chunk_end < end:  # the next chunk (none after the sequence's last, nor in a decode step)
                prefetch_steps(q_ptr, k_ptr, v_ptr, f_ptr, f_ptr, batch, chunk_end, end, seq_len,
                               tl.program_id(1) * HP, tl.program_id(2) * BR, tl.arange(0, CHUNK),
                               N, NQ, NK, NV, NF, K, V, False, False)
        if STORE_CHECKPOINTS:
            tl.store(checkpoint_ptr + checkpoint_offs + chunk * BK * BV, H.to(checkpoint_ptr.dtype.element_ty))
        # Step t + 1's inputs are loaded while step t computes, so their latency is off the step chain, v one
        # element at a time (see load_step).
        q_t, k_t, v_t, f_t = load_step(q_ptr, k_ptr, v_ptr, f_ptr, batch, chunk_start, seq_len, heads, rk, rv,
                                       N, NQ, NK, NV, NF, K, V, True)
        for t in range(chunk_start, chunk_end):
            g_t = input_gate(f_t)
            t_next = tl.minimum(t + 1, chunk_end - 1)
            q_next, k_next, v_next, f_next = load_step(q_ptr, k_ptr, v_ptr, f_ptr, batch, t_next, seq_len, heads,
                                                       rk, rv, N, NQ, NK, NV, NF, K, V, True)
            H = blend(H, candidate(H.to(DOT_DTYPE), W_dot, k_t, v_t, DOT_PRECISION, FAST_TANH), g_t)
            store_y_partial(y_partial_ptr, batch, seq_len, t, q_t, H, heads, N, HP, BR, BV, V, LANE_SUMS)
            q_t, k_t, v_t, f_t = q_next, k_next, v_next, f_next

    tl.store(h_final_ptr + state_base + state_offsets, H, mask=state_mask)


@triton.jit
def store_y_partial(y_partial_ptr, batch, seq_len, t, q_t, H, heads,
                    N: tl.constexpr, HP: tl.constexpr, BR: tl.constexpr, BV: tl.constexpr, V: tl.constexpr,
                    LANE_SUMS: tl.constexpr):
    """This row block's part of y_t = Σ_i q_t[i] H_t[i,:]."""
    y_row = y_partial_ptr + (batch * seq_len + t).to(tl.int64) * N * V
    store_column_sums(y_row, q_t[:, :, None] * H, heads, True, HP, BR, BV, V, LANE_SUMS)
