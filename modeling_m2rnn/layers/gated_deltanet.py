"""The Gated DeltaNet token mixer with lm-engine's semantics (docs/design.md, "Gated DeltaNet"): its output is gated
before its norm."""

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import gated_delta_rule
from .cached_recurrence import cached_recurrence
from .decay import softplus_log_decay
from .linear import Linear
from .norm import RMSNorm, rms_norm
from .packing import PackedSequences
from .short_conv import short_conv_silu


class GatedDeltaNet(nn.Module):
    """One Gated DeltaNet layer: x (B, S, hidden) → (B, S, hidden).

    `qkv_proj` gives q, k (Hk heads of K) and v (H heads of V) through a depthwise causal conv and SiLU; `ab_proj`
    gives the decay input a, the write strength b (one each per head) and the output gate (H·V). With
    beta = sigmoid(b) (2·sigmoid(b) with negative eigenvalues) and the log decay g = −exp(A_log)·softplus(a + dt_bias),
    each head runs the gated delta rule on l2-normalised q, k (`kernels.gated_delta_rule`, scale K^-1/2) over a K×V
    state; its output is gated, then RMS-normalised per head: o = norm(o ⊙ silu(gate)), and projected back.
    With Hk < H, each q, k head serves H / Hk consecutive heads.
    """

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.gdn_num_heads
        self.num_k_heads = config.gdn_num_k_heads or config.gdn_num_heads
        # (tensor parallelism makes both counts this rank's: distributed/tensor_parallel.py)
        self.key_head_dim = config.gdn_key_head_dim
        self.value_head_dim = config.gdn_value_head_dim
        self.use_gate = config.gdn_use_gate
        self.allow_neg_eigval = config.gdn_allow_neg_eigval
        self.backend = config.gdn_backend
        self.conv_backend = config.m2rnn_kernel_backend   # the package's short-conv kernels, as in the M2RNN layers
        self.qkv_proj = Linear(config.hidden_size, sum(self.qkv_sizes), bias=False)
        self.ab_proj = Linear(config.hidden_size, sum(self.ab_sizes), bias=False)

        self.conv_kernel_size = config.gdn_conv_kernel_size
        self.conv_weight = nn.Parameter(torch.empty(sum(self.qkv_sizes), self.conv_kernel_size))
        # Mamba2's decay, kept in float32
        self.A_log = nn.Parameter(torch.empty(self.num_heads, dtype=torch.float32))
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads, dtype=torch.float32))

        self.norm = RMSNorm(self.value_head_dim, eps=config.rms_norm_eps)   # one weight shared by the heads
        self.o_proj = Linear(self.num_heads * self.value_head_dim, config.hidden_size, bias=False)

    @property
    def qkv_sizes(self) -> list[int]:
        """Widths of the q, k and v blocks of `qkv_proj` and of the conv channels."""
        key_size = self.num_k_heads * self.key_head_dim
        return [key_size, key_size, self.num_heads * self.value_head_dim]

    @property
    def ab_sizes(self) -> list[int]:
        """Widths of the a, b (and gate) blocks of `ab_proj`."""
        return [self.num_heads, self.num_heads] + ([self.num_heads * self.value_head_dim] if self.use_gate else [])

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, k_heads={self.num_k_heads}, key_head_dim={self.key_head_dim}, "
            f"value_head_dim={self.value_head_dim}, conv_kernel_size={self.conv_kernel_size}, "
            f"use_gate={self.use_gate}, allow_neg_eigval={self.allow_neg_eigval}, backend={self.backend!r}"
        )

    def log_decay(self, a: torch.Tensor) -> torch.Tensor:
        """a (B, S, H) → g = −exp(A_log)·softplus(a + dt_bias) <= 0, float32."""
        return softplus_log_decay(a, self.A_log, self.dt_bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        packed: PackedSequences | None = None,
        cache=None,
    ) -> torch.Tensor:
        """hidden_states (B, S, hidden); padding_mask (B, S), 1 for tokens, 0 for padding; `cache` a transformers
        Cache whose layer `layer_idx` is a LinearAttentionLayer (conv window and float32 state), or None."""
        batch, seq_len, _ = hidden_states.shape
        qkv = self.qkv_proj(hidden_states)
        a, b, *gate = self.ab_proj(hidden_states).split(self.ab_sizes, dim=-1)
        if padding_mask is not None:
            qkv = qkv * padding_mask[..., None].to(qkv.dtype)   # padding must not enter the conv window

        q, k, v = short_conv_silu(
            qkv, self.conv_weight, self.qkv_sizes, self.layer_idx, padding_mask, packed, cache, self.conv_backend
        )
        q = q.reshape(batch, seq_len, self.num_k_heads, self.key_head_dim)
        k = k.reshape(batch, seq_len, self.num_k_heads, self.key_head_dim)
        v = v.reshape(batch, seq_len, self.num_heads, self.value_head_dim)
        if self.num_k_heads != self.num_heads:
            q, k = (x.repeat_interleave(self.num_heads // self.num_k_heads, dim=2) for x in (q, k))

        beta = b.sigmoid() * 2 if self.allow_neg_eigval else b.sigmoid()          # (B, S, H)
        g = self.log_decay(a)                                                      # (B, S, H) float32
        if padding_mask is not None:
            # decay 1 and no write: the state passes a pad unchanged
            is_pad = ~padding_mask.bool()[..., None]
            g, beta = g.masked_fill(is_pad, 0.0), beta.masked_fill(is_pad, 0.0)

        o = cached_recurrence(self.recurrence, (q, k, v, g, beta), packed, cache, self.layer_idx)   # (B, S, H, V)

        if self.use_gate:
            o = o * F.silu(gate[0].view(batch, seq_len, self.num_heads, self.value_head_dim))
        o = rms_norm(o, self.norm.weight, self.norm.eps)                         # per head, over V
        return self.o_proj(o.flatten(2))                                           # (B, S, H·V) → (B, S, hidden)

    def recurrence(self, q, k, v, g, beta, initial_state, packed: PackedSequences | None):
        """The gated delta rule over the batch, or over packed sequences laid end to end (each with its own start
        state: the cached one for a row's first sequence, zero for the others)."""
        rule = {"qk_l2norm": True, "backend": self.backend}
        if packed is None:
            return gated_delta_rule(q, k, v, g, beta, initial_state=initial_state, **rule)

        batch, seq_len = g.shape[:2]
        o, final_states = gated_delta_rule(
            *(packed.flatten(x) for x in (q, k, v, g, beta)),
            initial_state=packed.start_states(initial_state),
            cu_seqlens=packed.cu_seqlens,
            **rule,
        )
        return o.view(batch, seq_len, *o.shape[2:]), final_states[packed.last_sequence]
