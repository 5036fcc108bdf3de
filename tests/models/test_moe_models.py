"""Models with sparse MoE MLP layers end to end on the CPU: config, experts implementations, cache, padding, packing,
the router's aux loss, LoRA, gradient checkpointing, checkpoints and the Trainer.

Tiny hybrid (M2RNN, attention, M2RNN) with MoE MLPs in layers 0 and 2: 5 experts, top 2, expert width 12, shared
expert 16, hidden 32 (float32 rows of 16-byte multiples, so torch's grouped matmul kernel runs). Tolerances as in
tests/test_modeling.py and tests/test_training.py: logits within 1e-5 (1e-4 for cached decoding), gradients within
1e-6 + 1e-4 · max|reference|.
"""

import math

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from modeling_m2rnn import M2RNNCache, M2RNNConfig, M2RNNForCausalLM
from modeling_m2rnn.layers import GatedMLP, SparseMoeMLP

from helpers import (
    REMOTE_CODE_INPUT,
    assert_packed_rows_equal_sequences_alone,
    left_pad,
    logits_through_remote_code,
    random_ids,
    tiny_config,
    tiny_model,
)

MOE = {"mlp_layer_types": ["sparse", "dense", "sparse"], "num_experts": 5, "num_experts_per_tok": 2,
       "moe_intermediate_size": 12, "shared_expert_intermediate_size": 16}
MOE_FIELDS = ["mlp_layer_types", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
              "shared_expert_intermediate_size", "norm_topk_prob", "router_aux_loss_coef", "output_router_logits"]


def moe_model(seed: int = 0, **overrides) -> M2RNNForCausalLM:
    return tiny_model("hybrid", seed=seed, **{**MOE, **overrides})


def gradients(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_gradients_close(actual: dict, expected: dict, atol=1e-6, rtol=1e-4):
    assert actual.keys() == expected.keys()
    for name, grad in expected.items():
        assert (actual[name] - grad).abs().max() <= atol + rtol * grad.abs().max(), name


def test_sparse_layers_hold_the_moe_mlp_under_the_planned_parameter_names():
    model = moe_model()
    assert [type(layer.mlp) for layer in model.model.layers] == [SparseMoeMLP, GatedMLP, SparseMoeMLP]
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters() if name.startswith("model.layers.0.mlp.")}
    assert shapes == {
        "model.layers.0.mlp.router.weight": (5, 32),
        "model.layers.0.mlp.experts.gate_up_proj": (5, 24, 32),
        "model.layers.0.mlp.experts.down_proj": (5, 32, 12),
        "model.layers.0.mlp.shared_expert.gate_proj.weight": (16, 32),
        "model.layers.0.mlp.shared_expert.up_proj.weight": (16, 32),
        "model.layers.0.mlp.shared_expert.down_proj.weight": (32, 16),
    }


def test_expert_weights_are_initialised_like_the_dense_projections():
    """normal(0, initializer_range) for the router and the experts' gate/up, the depth-scaled
    initializer_range / sqrt(2 · layers) for every projection that writes into the residual stream: the experts',
    the shared expert's and the dense MLP's down projections and attention's o_proj (wide layers, so that the sample
    std is within 5%)."""
    model = moe_model(num_experts=64, shared_expert_intermediate_size=512, intermediate_size=512, head_dim=64)
    sparse, attention_layer = model.model.layers[2], model.model.layers[1]
    output_std = 0.2 / math.sqrt(6)
    expected_std = {
        sparse.mlp.router.weight: 0.2,
        sparse.mlp.experts.gate_up_proj: 0.2,
        sparse.mlp.experts.down_proj: output_std,
        sparse.mlp.shared_expert.down_proj.weight: output_std,
        attention_layer.mlp.down_proj.weight: output_std,
        attention_layer.self_attn.o_proj.weight: output_std,
    }
    for weight, std in expected_std.items():
        assert abs(weight.std().item() / std - 1) < 0.05
        assert abs(weight.mean().item()) < 0.05 * std


def test_old_configs_load_with_dense_mlps():
    old = {k: v for k, v in tiny_config("hybrid").to_dict().items() if k not in MOE_FIELDS}
    config = M2RNNConfig.from_dict(old)
    assert config.mlp_layer_types == ["dense"] * 3 and not config.output_router_logits
    assert all(type(layer.mlp) is GatedMLP for layer in M2RNNForCausalLM(config).model.layers)


@pytest.mark.parametrize(
    "fields, field_named",
    [
        ({"mlp_layer_types": ["sparse", "dense"]}, "mlp_layer_types"),
        ({"mlp_layer_types": ["sparse", "moe", "dense"]}, "mlp_layer_types"),
        ({"mlp_layer_types": ["sparse", "dense", "dense"], "num_experts_per_tok": 6}, "num_experts_per_tok"),
        ({"mlp_layer_types": ["sparse", "dense", "dense"], "num_experts": 0}, "num_experts"),
        ({"mlp_layer_types": ["sparse", "dense", "dense"], "moe_intermediate_size": 0}, "moe_intermediate_size"),
        ({"mlp_layer_types": ["dense", "dense", "sparse"], "shared_expert_intermediate_size": -1},
         "shared_expert_intermediate_size"),
    ],
    ids=["wrong_length", "unknown_kind", "top_k_above_experts", "no_experts", "no_expert_width", "negative_shared"],
)
def test_a_moe_config_that_cannot_work_names_the_field(fields, field_named):
    with pytest.raises(StrictDataclassClassValidationError, match=f"`{field_named}`") as error:
        tiny_config("hybrid", **{**MOE, **fields})
    assert isinstance(error.value.__cause__, ValueError)


def test_a_dense_model_ignores_the_expert_fields():
    config = tiny_config("hybrid", num_experts=0)
    assert config.mlp_layer_types == ["dense"] * 3


def test_experts_run_through_transformers_implementations_grouped_mm_by_default(tmp_path):
    model = moe_model()
    assert model.config._experts_implementation == "grouped_mm"
    ids = random_ids(2, 9)
    with torch.no_grad():
        grouped = model(ids).logits
        for implementation in ("eager", "batched_mm"):
            model.set_experts_implementation(implementation)
            assert (model(ids).logits - grouped).abs().max() < 1e-5, implementation
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="batched_mm")
    assert reloaded.config._experts_implementation == "batched_mm"


@pytest.mark.parametrize("kind", ["pure", "hybrid"])
def test_cached_decoding_matches_one_full_forward(kind):
    model = tiny_model(kind, **MOE)
    ids = random_ids(2, 13)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = M2RNNCache(model.config)
        pieces = [model(ids[:, :4], past_key_values=cache, use_cache=True).logits]
        pieces += [model(ids[:, t : t + 1], past_key_values=cache).logits for t in range(4, 9)]
        pieces.append(model(ids[:, 9:], past_key_values=cache).logits)
    assert (torch.cat(pieces, dim=1) - full).abs().max() < 1e-4


def test_greedy_and_beam_generation_are_the_same_with_and_without_the_cache():
    model = moe_model(output_router_logits=True)   # the aux loss of each step reads the step's tokens only
    prompt = random_ids(2, 6, seed=1)
    for options in ({"do_sample": False}, {"num_beams": 3, "num_return_sequences": 2, "do_sample": False}):
        cached = model.generate(prompt, max_new_tokens=6, min_new_tokens=6, **options)
        uncached = model.generate(prompt, max_new_tokens=6, min_new_tokens=6, use_cache=False, **options)
        assert torch.equal(cached, uncached), options


def test_left_padded_batch_equals_each_prompt_alone():
    model = moe_model()
    prompts = [random_ids(n, seed=n) for n in (5, 9, 2)]
    ids, mask = left_pad(prompts)
    with torch.no_grad():
        batch_logits = model(ids, attention_mask=mask).logits
        for row, prompt in enumerate(prompts):
            alone = model(prompt[None]).logits[0]
            assert (batch_logits[row, -len(prompt):] - alone).abs().max() < 1e-5


def test_packed_rows_equal_their_sequences_run_alone():
    assert_packed_rows_equal_sequences_alone(moe_model())


def hand_load_balancing_loss(router_logits, mask, num_experts, top_k) -> float:
    """Switch Transformer's loss as transformers computes it over all layers at once: E · Σ_e f_e · P_e, f_e the
    share of real (layer, token) rows that chose expert e among their top k, P_e the mean of its softmax
    probability over those rows."""
    chosen_counts, probability_sums, rows = [0.0] * num_experts, [0.0] * num_experts, 0
    for layer_logits in router_logits:
        for logits, real in zip(layer_logits.tolist(), mask):
            if not real:
                continue
            rows += 1
            total = sum(math.exp(v) for v in logits)
            for e in sorted(range(num_experts), key=lambda e: -logits[e])[:top_k]:
                chosen_counts[e] += 1
            for e in range(num_experts):
                probability_sums[e] += math.exp(logits[e]) / total
    return num_experts * sum(c / rows * p / rows for c, p in zip(chosen_counts, probability_sums))


@pytest.mark.parametrize("padded", [False, True], ids=["full", "left_padded"])
def test_router_logits_and_their_load_balancing_loss_join_the_loss(padded):
    model = moe_model(router_aux_loss_coef=0.25)   # a large coefficient, to see it in the loss
    if padded:
        ids, mask = left_pad([random_ids(n, seed=n) for n in (7, 4)])
    else:
        ids, mask = random_ids(2, 7), torch.ones(2, 7, dtype=torch.long)
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        plain = model(ids, attention_mask=mask, labels=labels)
        routed = model(ids, attention_mask=mask, labels=labels, output_router_logits=True)

    assert plain.aux_loss is None and plain.router_logits is None
    assert [tuple(r.shape) for r in routed.router_logits] == [(14, 5), (14, 5)]   # the two sparse layers
    expected = hand_load_balancing_loss(routed.router_logits, mask.flatten().tolist(), 5, 2)
    assert routed.aux_loss.item() == pytest.approx(expected, rel=1e-5)
    if padded:   # the padding's rows would count otherwise
        assert abs(hand_load_balancing_loss(routed.router_logits, [1] * 14, 5, 2) - expected) > 1e-3
    assert routed.loss.item() == pytest.approx(plain.loss.item() + 0.25 * expected, rel=1e-5)
    assert torch.equal(routed.logits, plain.logits)


def test_lora_on_attention_and_recurrent_projections_trains_a_step():
    model = get_peft_model(moe_model(use_cache=False), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["in_proj", "out_proj", "q_proj", "k_proj", "v_proj",
                                                             "o_proj"]))
    adapters = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    assert {name.split(".")[-4] for name in adapters} == {"in_proj", "out_proj", "q_proj", "k_proj", "v_proj",
                                                          "o_proj"}
    assert any("experts.gate_up_proj" in name for name in frozen)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = random_ids(2, 10)
    model.train()
    model(input_ids=ids, labels=ids, output_router_logits=True).loss.backward()
    optimizer.step()

    for name, p in model.named_parameters():
        if name in adapters and "lora_B" in name:   # B starts at zero: the first step moves it
            assert not torch.equal(p, adapters[name]), f"{name} did not train"
        elif name in frozen:
            assert torch.equal(p, frozen[name]), f"{name} changed"


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    ids = random_ids(2, 11)
    results = []
    for checkpointing in (False, True):
        model = moe_model(use_cache=False).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        loss = model(ids, labels=ids, output_router_logits=True).loss
        loss.backward()
        results.append((loss.item(), gradients(model)))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-6)
    assert "model.layers.0.mlp.router.weight" in results[0][1]
    assert_gradients_close(results[1][1], results[0][1])


def test_save_and_load_round_trip_bit_exactly(tmp_path):
    model = moe_model()
    ids = random_ids(2, 7)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is M2RNNForCausalLM and reloaded.config.mlp_layer_types == MOE["mlp_layer_types"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name]), name
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


def test_the_trainer_takes_steps_with_the_router_aux_loss(tmp_path):
    model = moe_model(use_cache=False, output_router_logits=True)
    before = model.model.layers[0].mlp.experts.gate_up_proj.detach().clone()
    data = [{"input_ids": ids, "labels": ids} for ids in (random_ids(12, seed=s).tolist() for s in range(8))]
    arguments = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                                  learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to="none",
                                  use_cpu=True)
    trainer = Trainer(model=model, args=arguments, train_dataset=data)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert trainer.state.global_step == 3 and len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert not torch.equal(model.model.layers[0].mlp.experts.gate_up_proj, before)


def test_a_moe_checkpoint_loads_with_trust_remote_code_on_grouped_mm(tmp_path):
    model = moe_model()
    model.save_pretrained(tmp_path / "checkpoint")
    got = logits_through_remote_code(
        tmp_path / "checkpoint", tmp_path, check="model.config._experts_implementation == 'grouped_mm'"
    )
    with torch.no_grad():
        expected = model(torch.tensor(REMOTE_CODE_INPUT)).logits
    assert torch.equal(got, expected)
