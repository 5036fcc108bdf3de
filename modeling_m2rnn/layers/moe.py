"""Sparse mixture-of-experts MLP (docs/design.md, "Mixture of experts"): a top-k router over SwiGLU experts stored as
3-D tensors and run through transformers' experts implementations, plus one ungated shared expert."""

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.integrations.moe import (
    ExpertsInterface,
    batched_mm_experts_forward,
    grouped_mm_experts_forward,
    use_experts_implementation,
)

from .mlp import GatedMLP

# torch's grouped matmul (CPU and CUDA) takes these element types, with every matrix row a multiple of 16 bytes
GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def grouped_mm_where_torch_takes_it(experts, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
    """transformers' "grouped_mm" experts forward where torch's grouped matmul takes the operands, else its
    "batched_mm" (the same sums, one small product per token and chosen expert).

    transformers hands torch's kernel any operands on a torch that has one, and the kernel refuses float64 and
    rows that are not a multiple of 16 bytes (a hidden or expert width of 12 in bfloat16, say). Under torch.compile,
    transformers gives weights other than bfloat16 to a loop of its own whose backward cannot be traced (it reads
    the group sizes as Python numbers), so compiled training takes "batched_mm" there too."""
    weight = experts.gate_up_proj
    hidden, intermediate = experts.down_proj.shape[1:]
    takes_it = (
        weight.dtype in GROUPED_MM_DTYPES
        and all(width * weight.element_size() % 16 == 0 for width in (hidden, intermediate))
        and not (torch.compiler.is_compiling() and weight.dtype != torch.bfloat16)
    )
    implementation = grouped_mm_experts_forward if takes_it else batched_mm_experts_forward
    return implementation(experts, hidden_states, top_k_index, top_k_weights)


# transformers' experts implementations, "grouped_mm" (their default, chosen at model init) guarded as above
EXPERTS_IMPLEMENTATIONS = ExpertsInterface()
EXPERTS_IMPLEMENTATIONS["grouped_mm"] = grouped_mm_where_torch_takes_it


@use_experts_implementation(experts_interface=EXPERTS_IMPLEMENTATIONS)
class Experts(nn.Module):
    """E SwiGLU experts as the 3-D tensors transformers' experts implementations take: `gate_up_proj` (E, 2I, hidden),
    gate rows then up rows, and `down_proj` (E, hidden, I). `config._experts_implementation` chooses the
    implementation: "grouped_mm" (the default: one grouped matmul per projection), "batched_mm", or "eager", the
    forward below."""

    def __init__(self, config):
        super().__init__()
        self.num_experts = config.num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(config.num_experts, 2 * config.moe_intermediate_size,
                                                     config.hidden_size))
        self.down_proj = nn.Parameter(torch.empty(config.num_experts, config.hidden_size,
                                                  config.moe_intermediate_size))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
        """The definition, no tokens dispatched: every expert on every token, summed with the routing weights (zero
        for the experts a token did not choose). E/k times the routed work: a reference, not a training path.

        hidden_states (T, hidden); top_k_index, top_k_weights (T, k) -> (T, hidden)
        """
        weights = torch.zeros(hidden_states.shape[0], self.num_experts, dtype=top_k_weights.dtype,
                              device=top_k_weights.device).scatter(1, top_k_index, top_k_weights)   # (T, E)
        gate, up = torch.einsum("th,eoh->teo", hidden_states, self.gate_up_proj).chunk(2, dim=-1)   # (T, E, I) each
        out = torch.einsum("tei,ehi->teh", self.act_fn(gate) * up, self.down_proj)   # (T, E, hidden)
        return torch.einsum("teh,te->th", out, weights.to(out.dtype))


class TopKRouter(nn.Module):
    """Router logits x·Wᵀ (no bias); the top k of them choose the experts, weighted by the softmax over the k chosen
    logits (`norm_topk_prob=True`), or by their softmax over all experts (`False`)."""

    def __init__(self, config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))

    def forward(self, hidden_states):
        """hidden_states (T, hidden) -> router_logits (T, E), top_k_weights (T, k) in the input's dtype,
        top_k_index (T, k)."""
        router_logits = F.linear(hidden_states, self.weight)
        softmax_dtype = torch.promote_types(router_logits.dtype, torch.float32)   # float32 at least
        if self.norm_topk_prob:
            top_k_logits, top_k_index = router_logits.topk(self.top_k, dim=-1)
            top_k_weights = top_k_logits.to(softmax_dtype).softmax(dim=-1)
        else:
            top_k_weights, top_k_index = router_logits.to(softmax_dtype).softmax(dim=-1).topk(self.top_k, dim=-1)
        return router_logits, top_k_weights.to(hidden_states.dtype), top_k_index


class SparseMoeMLP(nn.Module):
    """Routed SwiGLU experts plus the shared expert, a dense SwiGLU MLP every token goes through, ungated."""

    def __init__(self, config):
        super().__init__()
        self.router = TopKRouter(config)
        self.experts = Experts(config)
        width = config.shared_expert_intermediate_size
        self.shared_expert = GatedMLP(config, intermediate_size=width) if width > 0 else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states (..., hidden) -> (..., hidden); every token on its own (padding and packing need nothing)."""
        tokens = hidden_states.reshape(-1, hidden_states.shape[-1])   # (T, hidden)
        _, top_k_weights, top_k_index = self.router(tokens)
        out = self.experts(tokens, top_k_index, top_k_weights)
        if self.shared_expert is not None:
            out = out + self.shared_expert(tokens)
        return out.view_as(hidden_states)
