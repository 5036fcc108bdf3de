"""The M2RNN token mixer (docs/design.md, "The layer"): projections, forget gate, short convolution, recurrence,
gated norm."""

import torch
from torch import nn

from ..kernels import gated_rms_norm, m2rnn_scan
from .cached_recurrence import cached_recurrence
from .decay import softplus_log_decay
from .linear import Linear
from .norm import RMSNorm
from .packing import PackedSequences
from .short_conv import short_conv_silu


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
        self.kernel_backend = config.m2rnn_kernel_backend
        # Set by tensor parallelism (distributed/tensor_parallel.py), which also makes the head counts above this
        # rank's: averages the norm's mean square over the ranks that hold the other heads.
        self.mean_over_head_shards = None
        qkv_size = sum(self.qkv_sizes)
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

    @property
    def qkv_sizes(self) -> list[int]:
        """Widths of the q, k and v blocks of the projection and of the conv channels."""
        return [self.num_q_heads * self.key_head_dim, self.num_k_heads * self.key_head_dim,
                self.num_v_heads * self.value_head_dim]

    @property
    def projection_sizes(self) -> list[int]:
        """Widths of the q·k·v, a and g blocks of the input projection."""
        return [sum(self.qkv_sizes), self.num_f_heads, self.num_g_heads * self.value_head_dim]

    def extra_repr(self) -> str:
        """The layer's shape in `print(model)`, as nn.Linear shows its sizes."""
        head_counts = (self.num_q_heads, self.num_k_heads, self.num_v_heads, self.num_f_heads, self.num_g_heads,
                       self.W.shape[0])
        per_input = ", ".join(f"{name} {count}" for name, count in zip(("q", "k", "v", "f", "g", "W"), head_counts))
        return (
            f"heads={self.num_heads} ({per_input}), K={self.key_head_dim}, V={self.value_head_dim}, "
            f"conv_kernel_size={self.conv_kernel_size}, gradient_clipping={self.gradient_clipping}, "
            f"residual={self.D is not None}, kernel_backend={self.kernel_backend!r}"
        )

    def forget_gate(self, a: torch.Tensor) -> torch.Tensor:
        """a (B, S, Nf) → f in (0, 1], float32: in bf16 every f above ~0.998 would round to 1 and freeze its head."""
        return torch.exp(softplus_log_decay(a, self.A_log, self.dt_bias))

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

        y = cached_recurrence(self.recurrence, (q, k, v, forget), packed, cache, self.layer_idx)   # (B, S, N, V)
        g = g.view(batch, seq_len, self.num_g_heads, self.value_head_dim)
        return self.out_proj(self.gate_and_norm(y, v, g))                         # (B, S, N·V) → (B, S, hidden)

    def gate_and_norm(self, y: torch.Tensor, v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """RMSNorm((y + D ⊙ v) ⊙ silu(g)) over all heads: y (B, S, N, V), v (B, S, Nv, V), g (B, S, Ng, V) →
        (B, S, N·V). With the heads split across ranks, over the heads of every rank (on the PyTorch path)."""
        v = v if self.D is not None else None
        return gated_rms_norm(y, g, self.norm.weight, self.norm.eps, v, self.D, backend=self.kernel_backend,
                              mean_over_parts=self.mean_over_head_shards)

    def project(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The q·k·v, a and g blocks of the input projection, each in a buffer of its own (see Linear.forward_blocks).
        A wrapped projection (PEFT's LoRA layers, quantised linears) is called as a module, so that what wraps it
        applies."""
        if isinstance(self.in_proj, Linear):
            return self.in_proj.forward_blocks(hidden_states, self.projection_sizes)
        return self.in_proj(hidden_states).split(self.projection_sizes, dim=-1)

    def short_conv(self, qkv, padding_mask, packed: PackedSequences | None, cache) -> tuple[torch.Tensor, ...]:
        """q, k, v: the blocks of silu(causal conv of qkv (B, S, C)); without a conv, the blocks of qkv."""
        if self.conv_kernel_size is None:
            return qkv.split(self.qkv_sizes, dim=-1)
        return short_conv_silu(
            qkv, self.conv_weight, self.qkv_sizes, self.layer_idx, padding_mask, packed, cache, self.kernel_backend
        )

    def recurrence(self, q, k, v, forget, initial_state, packed: PackedSequences | None):
        """The scan over the batch, or over packed sequences laid end to end (each with its own start state)."""
        scan = dict(W=self.W, gradient_clipping=self.gradient_clipping, backend=self.kernel_backend)
        if packed is None:
            return m2rnn_scan(q, k, v, f=forget, initial_state=initial_state, **scan)

        batch, seq_len = forget.shape[:2]
        y, final_states = m2rnn_scan(
            *(packed.flatten(x) for x in (q, k, v)),
            f=packed.flatten(forget),
            initial_state=packed.start_states(initial_state),
            cu_seqlens=packed.cu_seqlens,
            **scan,
        )
        return y.view(batch, seq_len, *y.shape[2:]), final_states[packed.last_sequence]
