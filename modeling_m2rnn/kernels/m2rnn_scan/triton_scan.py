"""The Triton backend of `m2rnn_scan`, registered as torch library custom ops so that it runs
under torch.compile without graph breaks. For 16-bit sequences the forward and the backward launch the Gluon
kernels (gluon_forward.py, gluon_backward.py) where fast_path.py enables them, else their plain-Triton twins
(triton_forward.py, triton_backward.py).

Ops (all functional):
  m2rnn::scan(q, k, v, W, f, initial_state?, cu_seqlens?, gradient_clipping?, store_checkpoints)
      -> (y, final_state, checkpoints)       autograd registered; checkpoints is empty unless stored
  m2rnn::scan_backward(...) -> (dq, dk, dv, dW, df, d_initial_state)

Precision: the state and the blend run in float32. For bf16 / fp16 inputs the H·W product takes
fp16 operands (|H| <= 1, so fp16 keeps 3 more mantissa bits than bf16) with float32 accumulation,
tanh is the GPU's tanh.approx (rel. error 2^-11), the backward's gradient products take bf16 operands
(float32 range: gradients may be tiny) with float32 accumulation (KernelConfig.backward_products),
checkpoints and replayed states are stored in fp16, and the per-program dq, dk partials in bf16 for bf16
inputs (float32 otherwise).
float32 inputs use full-float32 products, exact tanh and float32 storage. float64 inputs go to the
PyTorch reference loop.

Without gradients (inference, decoding) no checkpoints are stored, and in eager mode the forward
kernel is launched without the op dispatcher. Decoding (S == 1) is that kernel with one step:
Triton specialises seq_len == 1, nothing reads back to the host, and every shape is static, so the
call can be captured in a CUDA graph.
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from ..backend import launches_directly, needs_grad
from .fast_path import gluon_kernel_enabled
from .gluon_backward import scan_backward_gluon_kernel
from .gluon_forward import scan_forward_gluon_kernel
from .triton_backward import scan_backward_kernel
from .triton_forward import scan_forward_kernel


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters; `benchmarks/bench_scan.py` compares settings on the GPU."""

    # Steps between forward checkpoints; the backward replays one chunk at a time. Longer chunks save a little
    # checkpoint memory, but their replayed states no longer fit the GPU's L2 cache at the 400M shape. Chunks of 16
    # double the checkpoints, which every M2RNN layer of a model holds from its forward to its backward, for a
    # backward a few percent faster where measured (benchmarks/RESULTS.md).
    chunk: int = 32
    # State rows per program (a power of two >= 16; capped at K rounded up). Rows evolve independently,
    # so fewer rows per program mean more, shorter programs in flight; y, dv, df and dW then take one
    # partial per row block (y's and dv's in the input dtype, summed by PyTorch in float32). 32 rows is the
    # fastest of 16, 32 and 64 forward and backward at the 400M shape (benchmarks/bench_scan.py compares them).
    forward_rows: int = 32
    forward_heads_per_program: int = 1
    forward_warps: int = 1
    backward_rows: int = 32
    # Heads sharing q, k summed in registers. More heads: fewer dq, dk partials but, on one warp per
    # head, a cross-warp sum every step, which costs more than the partials save.
    backward_max_heads_per_program: int = 1
    backward_warps: int = 1
    # Register caps of a backward program (ptxas maxnreg; GPU only): the Triton twin's, then the Gluon kernel's.
    # 65,536 registers per SM hold 11 one-warp programs of at most 184 registers, 12 of at most 168. Uncapped, the
    # count depends on the input dtypes and the Triton version, and a few registers more than the cap leave programs
    # out of a wave. The Gluon kernel's loop holds a replay step and a walk step at once: capped at 176 or 184 it runs
    # the 400M shape's 1,344 programs (B=8) about 20% slower than at 168, where the 7B shape and B=1 would gain 1-3%
    # from the extra registers (benchmarks/RESULTS.md).
    backward_max_registers: Optional[int] = 184
    gluon_backward_max_registers: Optional[int] = 168
    # The backward walks the time axis in segments of whole chunks, one launch each, so that the float32
    # dq, dk partials (B, segment, N / heads, K) stay within this many MiB (at least one chunk); the dv, df
    # partials of the row blocks are one segment long too.
    backward_partials_mib: int = 128
    # 16-bit inputs: the backward's dA·Wᵀ and H_{t-1}ᵀ·dA products take bf16 operands ("bf16"; float32
    # range, so tiny gradients survive) or float32 operands rounded to tf32 ("tf32"). bf16 halves the
    # shared-memory round trips that feed the tensor cores every step, with no loss of accuracy against float64.
    backward_products: str = "bf16"
    fast_tanh: bool = True  # tanh.approx on the GPU for 16-bit inputs; see triton_building_blocks.tanh
    # row and column sums by hand on the GPU for 16-bit inputs; see triton_building_blocks._column_sums
    lane_sums: bool = True
    # at each chunk, the next chunk's input rows asked into L2 and, in the backward, the chunk's own into L1 (GPU only;
    # see triton_building_blocks.prefetch_steps)
    prefetch: bool = True


CONFIG = KernelConfig()


@dataclass(frozen=True)
class ScanShape:
    batch: int
    seq_len: int
    num_heads: int
    nq: int
    nk: int
    nv: int
    nf: int
    nw: int
    key_dim: int
    value_dim: int
    num_states: int  # B, or the number of packed sequences
    varlen: bool

    @staticmethod
    def of(q, k, v, W, f, cu_seqlens) -> "ScanShape":
        batch, seq_len, nq, key_dim = q.shape
        nk, nv, nf, nw = k.shape[2], v.shape[2], f.shape[2], W.shape[0]
        varlen = cu_seqlens is not None
        return ScanShape(
            batch, seq_len, max(nq, nk, nv, nf, nw), nq, nk, nv, nf, nw, key_dim, v.shape[3],
            len(cu_seqlens) - 1 if varlen else batch, varlen,
        )

    @property
    def block_k(self) -> int:
        return max(16, triton.next_power_of_2(self.key_dim))

    @property
    def block_v(self) -> int:
        return max(16, triton.next_power_of_2(self.value_dim))

    def block_rows(self, rows: int) -> int:
        """State rows per program: `rows` (a power of two >= 16) capped at block_k, so it divides block_k."""
        return min(rows, self.block_k)

    def num_row_blocks(self, rows: int) -> int:
        return triton.cdiv(self.key_dim, self.block_rows(rows))

    def num_checkpoint_slots(self, chunk: int) -> int:
        # see checkpoint_slot_shift in triton_building_blocks.py
        return triton.cdiv(self.seq_len, chunk) + (self.num_states if self.varlen else 0)

    def head_constants(self) -> dict:
        return dict(N=self.num_heads, NQ=self.nq, NK=self.nk, NV=self.nv, NF=self.nf, NW=self.nw,
                    K=self.key_dim, V=self.value_dim, BK=self.block_k, BV=self.block_v)


def dot_constants(dtype: torch.dtype, on_gpu: bool, config: KernelConfig, warps: int, heads: int) -> dict:
    """Kernel constants that depend on the input dtype, the device and a program's warps and heads (see the
    module doc). The interpreter has no inline assembly (fast tanh, lane sums, prefetches). The lane sums also
    assume one warp's tensor-core accumulator layout (see triton_building_blocks._column_sums); they are checked on
    the GPU with one head per program."""
    full = dtype == torch.float32
    fast = on_gpu and not full
    return dict(
        DOT_DTYPE=tl.float32 if full else tl.float16,
        DOT_PRECISION="ieee",
        FAST_TANH=config.fast_tanh and fast,
        LANE_SUMS=config.lane_sums and fast and warps == 1 and heads == 1,
        PREFETCH=config.prefetch and on_gpu,
    )


def gradient_constants(dtype: torch.dtype, on_gpu: bool, config: KernelConfig) -> dict:
    """The backward's gradient products (see KernelConfig.backward_products). The Triton interpreter
    multiplies bf16 dot operands wrongly (triton 3.9), so off the GPU they stay tf32-like float32."""
    if dtype == torch.float32:
        return dict(GRAD_DTYPE=tl.float32, GRAD_PRECISION="ieee")
    if config.backward_products == "bf16" and on_gpu:
        return dict(GRAD_DTYPE=tl.bfloat16, GRAD_PRECISION="ieee")
    return dict(GRAD_DTYPE=tl.float32, GRAD_PRECISION="tf32")


def _register_cap(device: torch.device, max_registers: Optional[int]) -> dict:
    """Launch option capping a program's registers on the GPU (the interpreter takes no such option)."""
    return dict(maxnreg=max_registers) if device.type == "cuda" and max_registers is not None else {}


def _dot_torch_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.dtype == torch.float32 else torch.float16


def _backward_heads_per_program(shape: ScanShape) -> int:
    """Heads per backward program: a power of two dividing the q and k group sizes, so that the
    program's heads share one q row and one k row and their dq, dk can be summed in registers."""
    shared = math.gcd(shape.num_heads // shape.nq, shape.num_heads // shape.nk)
    heads = 1
    while heads * 2 <= CONFIG.backward_max_heads_per_program and shared % (heads * 2) == 0:
        heads *= 2
    return heads


def _backward_segment_steps(shape: ScanShape, programs: int, partial_bytes: int) -> int:
    """Steps per backward launch: whole chunks, as many as keep the dq and dk partials (B, steps, programs, K), of
    `partial_bytes` per element, within CONFIG.backward_partials_mib; all of S when that fits."""
    bytes_per_step = 2 * shape.batch * programs * shape.key_dim * partial_bytes
    chunks = max(1, CONFIG.backward_partials_mib * 2**20 // (bytes_per_step * CONFIG.chunk))
    return min(chunks * CONFIG.chunk, shape.seq_len)


def _checkpoint_buffer(shape: ScanShape, v: torch.Tensor, store: bool) -> torch.Tensor:
    """The state every CONFIG.chunk steps, in the dot dtype: fp16 for 16-bit inputs (|H| <= 1; the
    backward then replays from states rounded to 2^-11, far inside bf16 gradient accuracy)."""
    dtype = _dot_torch_dtype(v)
    if not store:
        return torch.empty(0, device=v.device, dtype=dtype)
    rows = 1 if shape.varlen else shape.batch
    slots = shape.num_checkpoint_slots(CONFIG.chunk)
    return torch.empty(rows, shape.num_heads, slots, shape.block_k, shape.block_v, device=v.device, dtype=dtype)


def _grouped(partial: torch.Tensor, dim: int, groups: int) -> torch.Tensor:
    """`partial` with `dim` split into (groups, members): the consecutive per-head (or per-program) partials of each
    group side by side along dim + 1."""
    return partial.unflatten(dim, (groups, partial.shape[dim] // groups))


def _sum_groups(partial: torch.Tensor, dim: int, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """Sum the consecutive per-head (or per-program) partials along `dim` into `groups` groups
    (PyTorch accumulates 16-bit sums in float32 and writes the input dtype: no float32 copy)."""
    if partial.shape[dim] == groups:
        return partial.to(dtype)
    return _grouped(partial, dim, groups).sum(dim + 1).to(dtype)


@triton.jit
def sum_partials_kernel(partial_ptr, out_ptr, num_rows, groups, steps,
                        partial_stride_batch, partial_stride_step, partial_stride_group, partial_stride_member,
                        out_stride_batch, out_stride_step, out_stride_group,
                        MEMBERS: tl.constexpr, K: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[b, t, g, :] = Σ_m partial[b, t, g, m, :] in float32, rounded once to out's dtype, for partials and out
    of any strides with unit stride along K. A program sums BLOCK_ROWS rows (b, t, g) one member at a time, each
    thread its own elements: no cross-thread reduction, and the unrolled loop keeps many loads in flight."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    columns = tl.arange(0, BLOCK_K)
    mask = (rows < num_rows)[:, None] & (columns < K)[None, :]
    step_rows = rows // groups
    batch, step, group = (step_rows // steps).to(tl.int64), step_rows % steps, rows % groups
    first_member = (partial_ptr + batch * partial_stride_batch + step * partial_stride_step
                    + group * partial_stride_group)[:, None] + columns[None, :]
    total = tl.zeros((BLOCK_ROWS, BLOCK_K), dtype=tl.float32)
    for member in tl.static_range(MEMBERS):
        total += tl.load(first_member + member * partial_stride_member, mask=mask, other=0.0).to(tl.float32)
    out_rows = batch * out_stride_batch + step * out_stride_step + group * out_stride_group
    tl.store(out_ptr + out_rows[:, None] + columns[None, :], total.to(out_ptr.dtype.element_ty), mask=mask)


def _sum_partials_into(out: torch.Tensor, partial: torch.Tensor):
    """out (B, steps, groups, K) = partial (B, steps, groups, members, K) summed over the members, accumulated in
    float32 and rounded once to out's dtype, in place. Both may be strided views (unit stride along K): slices of
    the whole sequence's gradients, views of the per-program or per-row-block partials. A kernel of its own, because
    torch.sum over many partials is slower, and PyTorch's add of partials into a strided slice runs without vector
    loads."""
    batch, steps, groups, key_dim = out.shape
    unit_stride = partial.stride(-1) == out.stride(-1) == 1
    if partial.shape[:3] != out.shape[:3] or partial.shape[-1] != key_dim or not unit_stride:
        raise ValueError(f"cannot sum partials {tuple(partial.shape)} into {tuple(out.shape)}")
    num_rows = batch * steps * groups
    block_k = triton.next_power_of_2(key_dim)
    block_rows = max(1, 512 // block_k)   # 512 elements: 16 per thread of one warp
    sum_partials_kernel[(triton.cdiv(num_rows, block_rows),)](
        partial, out, num_rows, groups, steps, *partial.stride()[:4], *out.stride()[:3],
        MEMBERS=partial.shape[3], K=key_dim, BLOCK_ROWS=block_rows, BLOCK_K=block_k, num_warps=1,
    )


def _sum_row_blocks(partials: torch.Tensor) -> torch.Tensor:
    """Sum the per-row-block partials (R, ...) in float32 into the partials' dtype. Two partials (K <= 64 at the
    default 32 rows per block) take one add: it rounds the float32 sum once, as sum(0) does, with the same bits,
    and is the faster kernel."""
    if partials.shape[0] == 1:
        return partials[0]
    if partials.shape[0] == 2:
        return partials[0] + partials[1]
    return partials.sum(0)


def _forward_rows(shape: ScanShape) -> int:
    """Rows per forward program. A decode step (S == 1) has no step chain to shorten: one program per
    head then writes y directly, without partials to sum."""
    return shape.block_k if shape.seq_len == 1 else CONFIG.forward_rows


def _runs_gluon(kernel: str, shape: ScanShape, dtype: torch.dtype, device: torch.device, heads: int,
                warps: int) -> bool:
    """Whether a launch of `kernel` ("forward" or "backward") takes the Gluon kernel (gluon_forward.py,
    gluon_backward.py) rather than its Triton twin: where fast_path enables it, for the launches the Gluon kernels are
    written for (16-bit inputs, one head per program on one warp) and checked on, over sequences (a decode step,
    S == 1, and its gradient keep the twins: they have no step chain to shorten)."""
    return (dtype in (torch.bfloat16, torch.float16) and heads == 1 and warps == 1 and shape.seq_len > 1
            and gluon_kernel_enabled(kernel, device))


def _scan_forward(q, k, v, W, f, initial_state, cu_seqlens, store_checkpoints):
    """Launch the forward kernel: (y, final_state, checkpoints)."""
    shape = ScanShape.of(q, k, v, W, f, cu_seqlens)
    q, k, v, W, f = (x.contiguous() for x in (q, k, v, W, f))
    rows = _forward_rows(shape)
    row_blocks = shape.num_row_blocks(rows)
    y_partials = torch.empty(row_blocks, shape.batch, shape.seq_len, shape.num_heads, shape.value_dim,
                             device=v.device, dtype=v.dtype)
    final_state = torch.empty(shape.num_states, shape.num_heads, shape.key_dim, shape.value_dim,
                              device=v.device, dtype=torch.float32)
    checkpoints = _checkpoint_buffer(shape, v, store_checkpoints)
    heads = CONFIG.forward_heads_per_program if shape.num_heads % CONFIG.forward_heads_per_program == 0 else 1
    grid = (shape.num_states, shape.num_heads // heads, row_blocks)
    gluon = _runs_gluon("forward", shape, v.dtype, v.device, heads, CONFIG.forward_warps)
    (scan_forward_gluon_kernel if gluon else scan_forward_kernel)[grid](
        q, k, v, W, f,
        initial_state.contiguous() if initial_state is not None else f,
        cu_seqlens if cu_seqlens is not None else f,
        y_partials, final_state, checkpoints if store_checkpoints else f,
        shape.seq_len, shape.num_checkpoint_slots(CONFIG.chunk), y_partials[0].numel(),
        **shape.head_constants(), HP=heads, BR=shape.block_rows(rows), CHUNK=CONFIG.chunk,
        HAS_H0=initial_state is not None, VARLEN=shape.varlen, STORE_CHECKPOINTS=store_checkpoints,
        **dot_constants(v.dtype, v.is_cuda, CONFIG, CONFIG.forward_warps, heads), num_warps=CONFIG.forward_warps,
    )
    return _sum_row_blocks(y_partials), final_state, checkpoints


@torch.library.custom_op("m2rnn::scan", mutates_args=())
def scan_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    W: torch.Tensor,
    f: torch.Tensor,
    initial_state: Optional[torch.Tensor],
    cu_seqlens: Optional[torch.Tensor],
    gradient_clipping: Optional[float],
    store_checkpoints: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _scan_forward(q, k, v, W, f, initial_state, cu_seqlens, store_checkpoints)


@scan_op.register_fake
def _(q, k, v, W, f, initial_state, cu_seqlens, gradient_clipping, store_checkpoints):
    shape = ScanShape.of(q, k, v, W, f, cu_seqlens)
    y = v.new_empty(shape.batch, shape.seq_len, shape.num_heads, shape.value_dim)
    final_state = v.new_empty(shape.num_states, shape.num_heads, shape.key_dim, shape.value_dim, dtype=torch.float32)
    return y, final_state, _checkpoint_buffer(shape, v, store_checkpoints)


@torch.library.custom_op("m2rnn::scan_backward", mutates_args=())
def scan_backward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    W: torch.Tensor,
    f: torch.Tensor,
    cu_seqlens: Optional[torch.Tensor],
    checkpoints: torch.Tensor,
    dy: torch.Tensor,
    d_final_state: Optional[torch.Tensor],
    gradient_clipping: Optional[float],
    initial_state_dtype: Optional[torch.dtype],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of m2rnn::scan; d_initial_state is empty when `initial_state_dtype` is None."""
    shape = ScanShape.of(q, k, v, W, f, cu_seqlens)
    q, k, v, W, f, dy = (x.contiguous() for x in (q, k, v, W, f, dy))
    heads = _backward_heads_per_program(shape)
    programs = shape.num_heads // heads
    rows = shape.block_rows(CONFIG.backward_rows)
    row_blocks = shape.num_row_blocks(rows)
    B, S, N, K, V = shape.batch, shape.seq_len, shape.num_heads, shape.key_dim, shape.value_dim
    device = v.device
    # One dq, dk partial per program: 84 to a row of q at the 400M shape, a visible share of forward+backward when
    # written and summed in float32. For bf16 inputs they are bf16, which keeps float32's range; a fp16 partial could
    # overflow where the sum of the group does not.
    partial_dtype = torch.bfloat16 if q.dtype == torch.bfloat16 else torch.float32
    segment = _backward_segment_steps(shape, programs, partial_dtype.itemsize)
    dq = torch.empty(B, S, shape.nq, K, device=device, dtype=q.dtype)
    dk = torch.empty(B, S, shape.nk, K, device=device, dtype=k.dtype)
    dq_partial = torch.empty(B, segment, programs, K, device=device, dtype=partial_dtype)
    dk_partial = torch.empty_like(dq_partial)
    dv = torch.empty_like(v)
    df = torch.empty_like(f)
    dv_partial = torch.empty(row_blocks, B, segment, N, V, device=device, dtype=v.dtype)
    df_partial = torch.empty(row_blocks, B, segment, N, device=device, dtype=torch.float32)
    dW_partial = torch.zeros(shape.num_states * row_blocks, N, V, V, device=device, dtype=torch.float32)
    if d_final_state is not None:
        dstate = d_final_state.to(torch.float32, copy=True).contiguous()
    else:
        dstate = torch.zeros(shape.num_states, N, K, V, device=device, dtype=torch.float32)
    gluon = _runs_gluon("backward", shape, v.dtype, device, heads, CONFIG.backward_warps)
    kernel = scan_backward_gluon_kernel if gluon else scan_backward_kernel
    # Each program's states for the steps of the chunk it walks.
    scratch = torch.empty(shape.num_states * programs * row_blocks, CONFIG.chunk, heads, rows, shape.block_v,
                          device=device, dtype=_dot_torch_dtype(v))
    for segment_start in reversed(range(0, S, segment)):
        segment_end = min(segment_start + segment, S)
        kernel[(shape.num_states, programs, row_blocks)](
            q, k, v, W, f, cu_seqlens if cu_seqlens is not None else f, checkpoints, dy,
            dstate, dq_partial, dk_partial, dv_partial, df_partial, dW_partial, scratch,
            S, shape.num_checkpoint_slots(CONFIG.chunk), gradient_clipping or 0.0,
            segment_start, segment_end, segment, B * segment,
            **shape.head_constants(), HP=heads, BR=rows, CHUNK=CONFIG.chunk, VARLEN=shape.varlen,
            CLIP=gradient_clipping is not None,
            **dot_constants(v.dtype, v.is_cuda, CONFIG, CONFIG.backward_warps, heads),
            **gradient_constants(v.dtype, v.is_cuda, CONFIG),
            num_warps=CONFIG.backward_warps,
            **_register_cap(device, CONFIG.gluon_backward_max_registers if gluon else CONFIG.backward_max_registers),
        )
        steps = segment_end - segment_start
        _sum_partials_into(dq[:, segment_start:segment_end], _grouped(dq_partial[:, :steps], 2, shape.nq))
        _sum_partials_into(dk[:, segment_start:segment_end], _grouped(dk_partial[:, :steps], 2, shape.nk))
        if shape.nv == N:   # the row blocks' partials (R, B, steps, N, V) as members
            _sum_partials_into(dv[:, segment_start:segment_end], dv_partial[:, :, :steps].permute(1, 2, 3, 0, 4))
        else:
            dv[:, segment_start:segment_end] = _sum_groups(_sum_row_blocks(dv_partial[:, :, :steps]), 2, shape.nv,
                                                           v.dtype)
        if shape.nf == N:   # as rows of one value each
            _sum_partials_into(df[:, segment_start:segment_end, :, None],
                               df_partial[:, :, :steps, :, None].permute(1, 2, 3, 0, 4))
        else:
            df[:, segment_start:segment_end] = _sum_groups(df_partial[:, :, :steps].sum(0), 2, shape.nf, f.dtype)
    store_dh0 = initial_state_dtype is not None
    return (
        dq,
        dk,
        dv,
        _sum_groups(dW_partial.sum(0), 0, shape.nw, W.dtype),
        df,
        dstate.to(initial_state_dtype) if store_dh0 else dstate.new_empty(0, N, K, V),
    )


@scan_backward_op.register_fake
def _(q, k, v, W, f, cu_seqlens, checkpoints, dy, d_final_state, gradient_clipping, initial_state_dtype):
    shape = ScanShape.of(q, k, v, W, f, cu_seqlens)
    num_states = shape.num_states if initial_state_dtype is not None else 0
    dh0 = q.new_empty(num_states, shape.num_heads, shape.key_dim, shape.value_dim,
                      dtype=initial_state_dtype or torch.float32)
    # Contiguous, as the kernel writes them, whatever the strides of the inputs (views of a projection).
    return tuple(x.new_empty(x.shape) for x in (q, k, v, W, f)) + (dh0,)


def _setup_context(ctx, inputs, output):
    q, k, v, W, f, initial_state, cu_seqlens, gradient_clipping, store_checkpoints = inputs
    if not store_checkpoints:
        # Callers go through m2rnn_scan_triton, which stores checkpoints whenever a gradient is needed.
        raise RuntimeError("m2rnn::scan was called without checkpoints but a gradient is needed")
    ctx.save_for_backward(q, k, v, W, f, cu_seqlens, output[2])
    # Unused outputs get None instead of a zero tensor (the checkpoints' would be as large as them).
    ctx.set_materialize_grads(False)
    ctx.gradient_clipping = gradient_clipping
    ctx.initial_state_dtype = initial_state.dtype if initial_state is not None and initial_state.requires_grad else None


def _backward(ctx, dy, d_final_state, _d_checkpoints):
    q, k, v, W, f, cu_seqlens, checkpoints = ctx.saved_tensors
    if dy is None:  # only the final state was used
        dy = v.new_zeros(*v.shape[:2], d_final_state.shape[1], v.shape[3])
    dq, dk, dv, dW, df, dh0 = scan_backward_op(
        q, k, v, W, f, cu_seqlens, checkpoints, dy, d_final_state, ctx.gradient_clipping, ctx.initial_state_dtype
    )
    return dq, dk, dv, dW, df, (dh0 if ctx.initial_state_dtype is not None else None), None, None, None


scan_op.register_autograd(_backward, setup_context=_setup_context)


def m2rnn_scan_triton(q, k, v, W, f, initial_state=None, gradient_clipping=None, cu_seqlens=None):
    """`m2rnn_scan` on Triton kernels for 16-bit and float32 inputs (validated by the caller). See the module doc."""
    inputs = (q, k, v, W, f, initial_state)
    if launches_directly(*inputs):
        y, final_state, _ = _scan_forward(q, k, v, W, f, initial_state, cu_seqlens, False)
        return y, final_state
    clip = float(gradient_clipping) if gradient_clipping is not None else None
    y, final_state, _ = scan_op(q, k, v, W, f, initial_state, cu_seqlens, clip, needs_grad(*inputs))
    return y, final_state
