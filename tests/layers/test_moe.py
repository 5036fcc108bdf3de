"""The sparse MoE MLP alone: routing and experts against a hand-computed case, and transformers' experts
implementations against the layer's definition.

Tolerances: float64 cases within 1e-12 relative; float32 (the grouped matmul kernel) within 1e-5 of float64, relative
to the output's largest element.
"""

import math
from types import SimpleNamespace

import pytest
import torch

import modeling_m2rnn.layers.moe as moe_module
from modeling_m2rnn.layers import SparseMoeMLP

IMPLEMENTATIONS = ["eager", "grouped_mm", "batched_mm"]


def moe_config(implementation="grouped_mm", **overrides):
    """The fields the layer reads (a full model config is not needed for one layer)."""
    fields = {"hidden_size": 3, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 1,
              "shared_expert_intermediate_size": 1, "norm_topk_prob": True, "hidden_act": "silu",
              "intermediate_size": None, "_experts_implementation": implementation}
    return SimpleNamespace(**{**fields, **overrides})


def silu(x: float) -> float:
    return x / (1 + math.exp(-x))


def dot(a, b) -> float:
    return sum(x * y for x, y in zip(a, b))


# Router rows: the logits of x are x0, x1, x2 and x0 + x1 + x2
ROUTER = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0]]
TOKENS = [[2.0, -1.0, 0.5], [-0.5, 0.25, 1.0], [0.0, 3.0, -2.0]]
LOGITS = [[2.0, -1.0, 0.5, 1.5], [-0.5, 0.25, 1.0, 0.75], [0.0, 3.0, -2.0, 1.0]]
# each token's two largest logits, by expert: experts 0 and 3, 2 and 3, 1 and 3
CHOSEN = [{0: 2.0, 3: 1.5}, {2: 1.0, 3: 0.75}, {1: 3.0, 3: 1.0}]


def hand_case_layer(implementation, norm_topk_prob=True):
    torch.manual_seed(0)
    layer = SparseMoeMLP(moe_config(implementation, norm_topk_prob=norm_topk_prob)).double()
    with torch.no_grad():
        layer.router.weight.copy_(torch.tensor(ROUTER))
        for p in layer.parameters():
            if p is not layer.router.weight:
                p.normal_()
    return layer


def hand_computed_output(layer, routing_weight) -> list[list[float]]:
    """Σ over the chosen experts of weight · down_e · silu(gate_e · x) · (up_e · x), plus the shared expert's."""
    gate_up = layer.experts.gate_up_proj.tolist()   # [e][0] gate row, [e][1] up row (I = 1)
    down = layer.experts.down_proj.tolist()          # [e][h][0]
    shared = layer.shared_expert
    shared_gate, shared_up = shared.gate_proj.weight[0].tolist(), shared.up_proj.weight[0].tolist()
    shared_down = shared.down_proj.weight[:, 0].tolist()
    outputs = []
    for t, x in enumerate(TOKENS):
        out = [shared_down[h] * silu(dot(shared_gate, x)) * dot(shared_up, x) for h in range(3)]
        for e in CHOSEN[t]:
            inner = silu(dot(gate_up[e][0], x)) * dot(gate_up[e][1], x)
            for h in range(3):
                out[h] += routing_weight(t, e) * down[e][h][0] * inner
        outputs.append(out)
    return outputs


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_top_k_on_the_logits_then_softmax_over_the_chosen_plus_the_shared_expert(implementation):
    layer = hand_case_layer(implementation)
    x = torch.tensor(TOKENS, dtype=torch.float64)

    logits, weights, index = layer.router(x)
    assert logits.tolist() == LOGITS
    assert [dict(zip(i, w)) for i, w in zip(index.tolist(), weights.tolist())] == [
        {e: pytest.approx(math.exp(logit) / sum(math.exp(v) for v in chosen.values()), rel=1e-12)
         for e, logit in chosen.items()}
        for chosen in CHOSEN
    ]

    def routing_weight(t, e):
        return math.exp(CHOSEN[t][e]) / sum(math.exp(v) for v in CHOSEN[t].values())

    expected = torch.tensor(hand_computed_output(layer, routing_weight), dtype=torch.float64)
    out = layer(x[None])   # (1, 3 tokens, hidden)
    assert out.shape == (1, 3, 3)
    assert (out[0] - expected).abs().max() <= 1e-12 * expected.abs().max()


def test_without_norm_topk_prob_the_chosen_weigh_their_softmax_over_all_experts():
    layer = hand_case_layer("grouped_mm", norm_topk_prob=False)

    def routing_weight(t, e):
        return math.exp(LOGITS[t][e]) / sum(math.exp(v) for v in LOGITS[t])

    expected = torch.tensor(hand_computed_output(layer, routing_weight), dtype=torch.float64)
    out = layer(torch.tensor(TOKENS, dtype=torch.float64))
    assert (out - expected).abs().max() <= 1e-12 * expected.abs().max()


def test_no_shared_expert_when_its_width_is_zero():
    layer = SparseMoeMLP(moe_config(shared_expert_intermediate_size=0))
    assert layer.shared_expert is None
    assert {name for name, _ in layer.named_parameters()} == {
        "router.weight", "experts.gate_up_proj", "experts.down_proj"
    }


def test_grouped_matmul_in_float32_matches_float64_with_its_gradients(monkeypatch):
    """At widths whose rows are 16-byte multiples torch's grouped kernel runs (the spy sees transformers' grouped_mm
    forward); forward and gradients match the float64 eager definition."""
    grouped_calls = []
    grouped = moe_module.grouped_mm_experts_forward
    monkeypatch.setattr(moe_module, "grouped_mm_experts_forward",
                        lambda *args: grouped_calls.append(1) or grouped(*args))
    config = {"hidden_size": 32, "num_experts": 7, "num_experts_per_tok": 3, "moe_intermediate_size": 12,
              "shared_expert_intermediate_size": 20}
    torch.manual_seed(1)
    reference = SparseMoeMLP(moe_config("eager", **config)).double()
    for p in reference.parameters():
        torch.nn.init.normal_(p, std=0.3)
    layer = SparseMoeMLP(moe_config("grouped_mm", **config))
    layer.load_state_dict(reference.state_dict())
    x = torch.randn(2, 13, 32, dtype=torch.float64)
    upstream = torch.randn(2, 13, 32, dtype=torch.float64)

    expected = reference(x)
    (expected * upstream).sum().backward()
    out = layer(x.float())
    (out * upstream.float()).sum().backward()

    assert grouped_calls == [1]
    assert (out.double() - expected).abs().max() <= 1e-5 * expected.abs().max()
    for (name, p), (_, p64) in zip(layer.named_parameters(), reference.named_parameters()):
        assert (p.grad.double() - p64.grad).abs().max() <= 1e-5 * p64.grad.abs().max(), name


@pytest.mark.parametrize("dtype, hidden", [(torch.float64, 32), (torch.float32, 3), (torch.bfloat16, 12)],
                         ids=["float64", "unaligned_float32", "unaligned_bfloat16"])
def test_grouped_mm_takes_batched_mm_where_torch_refuses_the_operands(monkeypatch, dtype, hidden):
    batched_calls = []
    batched = moe_module.batched_mm_experts_forward
    monkeypatch.setattr(moe_module, "batched_mm_experts_forward",
                        lambda *args: batched_calls.append(1) or batched(*args))
    config = {"hidden_size": hidden, "num_experts": 5, "num_experts_per_tok": 2, "moe_intermediate_size": 4}
    torch.manual_seed(2)
    layer = SparseMoeMLP(moe_config("grouped_mm", **config)).to(dtype)
    reference = SparseMoeMLP(moe_config("eager", **config)).to(dtype)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(9, hidden, dtype=dtype)
    out, expected = layer(x), reference(x)
    assert batched_calls == [1]
    bound = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    assert (out - expected).abs().max() <= bound * expected.abs().max()


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_gradients_are_the_finite_differences_of_the_output(implementation):
    """gradcheck in float64 for the tokens and every parameter, the router's included (its top-k weights are a
    softmax of the chosen logits; the hand case is far from ties, so the choice does not move under the steps)."""
    layer = hand_case_layer(implementation)
    names = [name for name, _ in layer.named_parameters()]
    x = torch.tensor(TOKENS, dtype=torch.float64, requires_grad=True)

    def forward(x, *params):
        return torch.func.functional_call(layer, dict(zip(names, params)), (x,))

    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    assert torch.autograd.gradcheck(forward, (x, *params))


def test_a_compiled_float32_training_step_matches_eager():
    """fullgraph torch.compile (aot_eager: the traced graphs, without inductor's C++ build) of forward and backward in
    float32: transformers' grouped path would hand its untraceable loop the backward, so the layer takes batched_mm."""
    config = {"hidden_size": 32, "num_experts": 5, "num_experts_per_tok": 2, "moe_intermediate_size": 12,
              "shared_expert_intermediate_size": 16}
    torch.manual_seed(3)
    layer = SparseMoeMLP(moe_config("grouped_mm", **config))
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 7, 32)
    results = []
    for forward in (layer, torch.compile(layer, fullgraph=True, backend="aot_eager")):
        layer.zero_grad()
        out = forward(x)
        out.square().sum().backward()
        results.append((out.detach(), {name: p.grad.clone() for name, p in layer.named_parameters()}))
    (eager_out, eager_grads), (compiled_out, compiled_grads) = results
    assert (compiled_out - eager_out).abs().max() <= 1e-5 * eager_out.abs().max()
    for name, grad in eager_grads.items():
        assert (compiled_grads[name] - grad).abs().max() <= 1e-5 * grad.abs().max(), name
