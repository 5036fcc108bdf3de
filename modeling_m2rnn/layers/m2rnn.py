"""The M2RNN token mixer (DESIGN.md §3): projections, forget gate, short convolution, recurrence, gated norm."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import causal_conv1d_silu, causal_conv1d_step, gated_rms_norm, m2rnn_scan, uses_triton
from .linear import Linear
from .norm import RMSNorm, rms_norm
from .short_conv import causal_conv1d


@dataclass
class PackedSequences:
    """Where sequences packed along the time axis begin, shared by every M2RNN layer of one forward pass.

    The rows of the batch are laid end to end on one time axis of length B·S, so that each row start and
    each restart inside a row begins a sequence of its own.
    """

    cu_seqlens: torch.Tensor          # (num_sequences + 1,) int32, boundaries on the flattened B·S axis
    first_sequence: torch.Tensor      # (B,) index of each row's first sequence: it continues the cached state
    last_sequence: torch.Tensor       # (B,) index of each row's last sequence: its final state is the row's
    sequence_ids: torch.Tensor        # (B, S) 0, 0, 1, 1, 1, 2, ...: which sequence of its row each token is in

    @classmethod
    def from_sequence_ids(cls, sequence_ids: torch.Tensor) -> "PackedSequences":
        """`sequence_ids` (B, S): 0, 0, 1, 1, 1, 2, ... counting the sequences of each row from 0."""
        batch, seq_len = sequence_ids.shape
        is_start = torch.ones_like(sequence_ids, dtype=torch.bool)
        is_start[:, 1:] = sequence_ids[:, 1:] != sequence_ids[:, :-1]
        starts = is_start.flatten().nonzero().squeeze(-1)
        cu_seqlens = F.pad(starts, (0, 1), value=batch * seq_len).to(torch.int32)
        sequences_per_row = is_start.sum(dim=1)
        last_sequence = sequences_per_row.cumsum(0) - 1
        first_sequence = last_sequence - sequences_per_row + 1

        return cls(cu_seqlens, first_sequence, last_sequence, sequence_ids)


def per_group(x: torch.Tensor, groups: int, shared: bool = False) -> torch.Tensor:
    """View the head axis (third from last) of x (..., heads, D) as (..., groups, heads // groups, D); with
    `shared`, x has one head per group, broadcast over the group's heads as `repeat_interleave` would copy it."""
    *lead, heads, dim = x.shape
    return x.unsqueeze(-2) if shared else x.view(*lead, groups, heads // groups, dim)


def gated_rms_norm_torch(y, g, weight, eps: float, v=None, D=None) -> torch.Tensor:
    """rms_norm((y + D ⊙ v) ⊙ silu(g), weight, eps) over all heads, in PyTorch: y (B, S, N, V), v (B, S, Nv, V),
    D (N, V), g (B, S, Ng, V), each v and g head shared by its group of heads; v and D are None without the
    residual. `kernels.gated_rms_norm` computes the same for per-head v and g, and is tested against this."""
    if D is not None:
        residual = per_group(D, v.shape[2]) * per_group(v, v.shape[2], shared=True)
        y = (per_group(y, v.shape[2]) + residual).flatten(2, 3)                  # (B, S, N, V)
    y = per_group(y, g.shape[2]) * per_group(F.silu(g), g.shape[2], shared=True)
    return rms_norm(y.flatten(2), weight, eps)                                     # (B, S, N·V)


class M2RNNMixer(nn.Module):
    """One M2RNN layer: x (B, S, hidden) → (B, S, hidden).

    The input projection gives q, k, v (through a short causal conv and SiLU), the forget-gate input `a`
    and the output gate `g`. Each of the N heads carries a K×V state through the recurrence of
    `kernels.m2rnn_scan`; the output adds `D ⊙ v`, is gated by `silu(g)`, RMS-normalised over all heads
    and projected back.
    """

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.key_head_dim = config.m2rnn_k_head_dim
        self.value_head_dim = config.m2rnn_v_head_dim
        self.num_heads = config.m2rnn_num_heads
        self.num_q_heads = config.m2rnn_num_q_heads
        self.num_k_heads = config.m2rnn_num_k_heads
        self.num_v_heads = config.m2rnn_num_v_heads
        self.num_f_heads = config.m2rnn_num_f_heads
        self.num_g_heads = config.m2rnn_num_g_heads
        self.gradient_clipping = config.m2rnn_gradient_clipping
        self.scan_backend = config.m2rnn_scan_backend
        self.qkv_sizes = [
            self.num_q_heads * self.key_head_dim,
            self.num_k_heads * self.key_head_dim,
            self.num_v_heads * self.value_head_dim,
        ]
        qkv_size = sum(self.qkv_sizes)
        self.projection_sizes = [qkv_size, self.num_f_heads, self.num_g_heads * self.value_head_dim]
        self.in_proj = Linear(config.hidden_size, sum(self.projection_sizes), bias=False)

        self.conv_kernel_size = config.m2rnn_conv_kernel_size
        if self.conv_kernel_size is not None:
            self.conv_weight = nn.Parameter(torch.empty(qkv_size, self.conv_kernel_size))

        # Mamba2's decay: f = exp(-exp(A_log) · softplus(a + dt_bias)), kept in float32.
        self.A_log = nn.Parameter(torch.empty(self.num_f_heads, dtype=torch.float32))
        self.dt_bias = nn.Parameter(torch.empty(self.num_f_heads, dtype=torch.float32))
        # The per-head V×V transition of the state, identity at init.
        self.W = nn.Parameter(torch.empty(config.m2rnn_num_weight_heads, self.value_head_dim, self.value_head_dim))
        self.D = nn.Parameter(torch.empty(self.num_heads, self.value_head_dim)) if config.m2rnn_use_residual else None

        self.norm = RMSNorm(self.num_heads * self.value_head_dim, eps=config.rms_norm_eps)
        self.out_proj = Linear(self.num_heads * self.value_head_dim, config.hidden_size, bias=False)

    def forget_gate(self, a: torch.Tensor) -> torch.Tensor:
        """a (B, S, Nf) → f in (0, 1], float32: in bf16 every f above ~0.998 would round to 1 and freeze its head."""
        return torch.exp(-torch.exp(self.A_log.float()) * F.softplus(a.float() + self.dt_bias.float()))

    def forward(
        self,
        hidden_states: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        packed: PackedSequences | None = None,
        cache=None,
    ) -> torch.Tensor:
        """hidden_states (B, S, hidden); padding_mask (B, S), 1 for tokens, 0 for padding; `cache` a transformers
        Cache whose layer `layer_idx` is a LinearAttentionLayer (conv window and state), or None."""
        batch, seq_len, _ = hidden_states.shape
        qkv, a, g = self.project(hidden_states)
        if padding_mask is not None:
            qkv = qkv * padding_mask[..., None].to(qkv.dtype)   # padding must not enter the conv window

        q, k, v = self.short_conv(qkv, padding_mask, packed, cache)
        # Copied into the layout the scan reads, which the scan op would otherwise copy itself, in the forward and
        # again in the backward. Under torch.compile the copies fuse into the PyTorch conv's activation; the Triton
        # conv op writes contiguous blocks itself.
        q, k, v = (x.contiguous() for x in (q, k, v))
        q = q.view(batch, seq_len, self.num_q_heads, self.key_head_dim)
        k = k.view(batch, seq_len, self.num_k_heads, self.key_head_dim)
        v = v.view(batch, seq_len, self.num_v_heads, self.value_head_dim)

        forget = self.forget_gate(a)                                               # (B, S, Nf) float32
        if padding_mask is not None:
            forget = forget.masked_fill(~padding_mask.bool()[..., None], 1.0)     # f = 1 holds the state exactly

        y, final_state = self.recurrence(q, k, v, forget, self.cached_state(cache), packed)
        if cache is not None:
            cache.update_recurrent_state(final_state, self.layer_idx)
            cache.layers[self.layer_idx].has_previous_state[0] = True   # without a conv nothing else sets it

        g = g.view(batch, seq_len, self.num_g_heads, self.value_head_dim)
        return self.out_proj(self.gate_and_norm(y, v, g))                         # (B, S, N·V) → (B, S, hidden)

    def gate_and_norm(self, y: torch.Tensor, v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """RMSNorm((y + D ⊙ v) ⊙ silu(g)) over all heads: y (B, S, N, V), v (B, S, Nv, V), g (B, S, Ng, V) →
        (B, S, N·V). On the Triton backend, with a v and a g per head, one kernel each way (kernels.gated_rms_norm):
        it writes the autocast dtype, which the output projection would cast to."""
        v = v if self.D is not None else None
        if self._is_gated_norm_kernel_case(y):
            device = y.device.type
            out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
            return gated_rms_norm(y, g, self.norm.weight, self.norm.eps, v, self.D, out_dtype)
        return gated_rms_norm_torch(y, g, self.norm.weight, self.norm.eps, v, self.D)

    def _is_gated_norm_kernel_case(self, y: torch.Tensor) -> bool:
        """Per-head v and g on the Triton backend; float64 keeps the PyTorch code, as the scan keeps its reference."""
        per_head = self.num_v_heads == self.num_g_heads == self.num_heads
        return per_head and y.dtype != torch.float64 and uses_triton(self.scan_backend, y)

    def project(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The q·k·v, a and g blocks of the input projection, each in a buffer of its own (see Linear.forward_blocks).
        A wrapped projection (PEFT's LoRA layers, quantised linears) is called as a module, so that what wraps it
        applies."""
        if isinstance(self.in_proj, Linear):
            return self.in_proj.forward_blocks(hidden_states, self.projection_sizes)
        return self.in_proj(hidden_states).split(self.projection_sizes, dim=-1)

    def short_conv(self, qkv, padding_mask, packed: PackedSequences | None, cache) -> tuple[torch.Tensor, ...]:
        """q, k, v: the blocks of silu(causal conv of qkv (B, S, C)), reading and updating the cached window when
        there is a cache; on the Triton backend a decode step and whole rows without padding or cache run on their
        kernels. Without a conv, the blocks of qkv."""
        if self.conv_kernel_size is None:
            return qkv.split(self.qkv_sizes, dim=-1)
        if self._is_conv_decode_step(qkv, padding_mask, cache):
            conv_state = cache.layers[self.layer_idx].conv_states[0]
            out = causal_conv1d_step(qkv[:, 0], conv_state, self.conv_weight).unsqueeze(1)
            return out.split(self.qkv_sizes, dim=-1)
        sequence_ids = packed.sequence_ids if packed is not None else None
        if self._is_conv_kernel_case(qkv, padding_mask, cache):
            return causal_conv1d_silu(qkv, self.conv_weight, sequence_ids, self.qkv_sizes)
        context = None
        if cache is not None:
            context = cache.update_conv_state(qkv.transpose(1, 2), self.layer_idx, conv_kernel_size=self.conv_kernel_size)
        out, last_inputs = causal_conv1d(qkv, self.conv_weight, context, padding_mask, sequence_ids)
        if cache is not None and padding_mask is not None:
            # the cache kept the last k positions; with padding among them, the window is the last k real inputs
            cache.layers[self.layer_idx].conv_states[0].copy_(last_inputs)
        return F.silu(out).split(self.qkv_sizes, dim=-1)

    def _is_conv_kernel_case(self, qkv, padding_mask, cache) -> bool:
        """Whole rows without padding or cache (training) on the Triton backend. The kernel computes in float32, so
        float64 keeps the PyTorch conv, as the scan keeps its reference."""
        no_window = cache is None and padding_mask is None
        return no_window and qkv.dtype != torch.float64 and uses_triton(self.scan_backend, qkv)

    def _is_conv_decode_step(self, qkv, padding_mask, cache) -> bool:
        """One new token after a cached window, on the Triton backend, without gradients (the kernel has no
        backward): the conv step kernel's case."""
        if cache is None or qkv.shape[1] != 1 or padding_mask is not None or not uses_triton(self.scan_backend, qkv):
            return False
        if torch.is_grad_enabled() and (qkv.requires_grad or self.conv_weight.requires_grad):
            return False
        layer = cache.layers[self.layer_idx]
        return layer.has_previous_state[0] and layer.conv_states[0].shape[-1] == self.conv_kernel_size

    def cached_state(self, cache) -> torch.Tensor | None:
        if cache is None:
            return None
        layer = cache.layers[self.layer_idx]
        return layer.recurrent_states[0] if layer.is_recurrent_states_initialized[0] else None

    def recurrence(self, q, k, v, forget, initial_state, packed: PackedSequences | None):
        """The scan over the batch, or over packed sequences laid end to end (each with its own start state)."""
        scan = dict(W=self.W, gradient_clipping=self.gradient_clipping, backend=self.scan_backend)
        if packed is None:
            return m2rnn_scan(q, k, v, f=forget, initial_state=initial_state, **scan)

        batch, seq_len = forget.shape[:2]
        num_sequences = packed.cu_seqlens.numel() - 1
        start_states = None
        if initial_state is not None:
            start_states = initial_state.new_zeros(num_sequences, *initial_state.shape[1:])
            start_states = start_states.index_copy(0, packed.first_sequence, initial_state)
        y, final_states = m2rnn_scan(
            *(x.reshape(1, batch * seq_len, *x.shape[2:]) for x in (q, k, v)),
            f=forget.reshape(1, batch * seq_len, -1),
            initial_state=start_states,
            cu_seqlens=packed.cu_seqlens,
            **scan,
        )
        return y.view(batch, seq_len, *y.shape[2:]), final_states[packed.last_sequence]
