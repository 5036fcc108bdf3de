"""What the model class declares to transformers matches what it does: float32 decay parameters on every load, and
a forward that compiles as one graph. Compiled, the model computes what it computes eagerly: the attention masks
(SDPA's is_causal where only the future is masked) and packed sequences."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from modeling_m2rnn import M2RNNForCausalLM, M2RNNStaticCache

from helpers import random_ids, tiny_model

FLOAT32_PARAMETERS = ("A_log", "dt_bias")


def test_the_decay_parameters_are_declared_float32_on_every_load():
    """`_keep_in_fp32_modules` means float32 on a float16 load only; the decay parameters stay float32 under bf16
    too, which is what `_keep_in_fp32_modules_strict` declares (as transformers' nemotron_h does)."""
    assert set(M2RNNForCausalLM._keep_in_fp32_modules_strict) == set(FLOAT32_PARAMETERS)
    assert not set(M2RNNForCausalLM._keep_in_fp32_modules or ()) & set(FLOAT32_PARAMETERS)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_load_keeps_the_decay_in_float32_and_casts_the_rest(dtype, tmp_path):
    tiny_model("hybrid").save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype)
    for name, parameter in model.named_parameters():
        expected = torch.float32 if name.endswith(FLOAT32_PARAMETERS) else dtype
        assert parameter.dtype == expected, name
    assert sum(name.endswith(FLOAT32_PARAMETERS) for name, _ in model.named_parameters()) == 4   # two M2RNN layers


def test_the_model_declares_a_fullgraph_compile():
    assert M2RNNForCausalLM._can_compile_fullgraph


GDN_MOE = dict(layer_types=["gated_deltanet", "full_attention", "m2rnn"], mlp_layer_types=["sparse", "dense", "sparse"],
               num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, shared_expert_intermediate_size=8,
               gdn_num_heads=2, gdn_key_head_dim=6, gdn_value_head_dim=5, gdn_conv_kernel_size=3)


@pytest.mark.parametrize("kind", ["pure", "hybrid", "gdn_moe"])
def test_prefill_and_decode_on_a_static_cache_compile_as_one_graph_each(kind):
    """fullgraph=True fails at any graph break; the eager backend traces with dynamo without compiling kernels."""
    torch._dynamo.reset()
    model = tiny_model("hybrid", **GDN_MOE) if kind == "gdn_moe" else tiny_model(kind)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    prompt, new_token = random_ids(2, 7, seed=1), random_ids(2, 1, seed=2)
    eager_cache = M2RNNStaticCache(model.config, max_cache_len=11)
    compiled_cache = M2RNNStaticCache(model.config, max_cache_len=11)
    with torch.no_grad():
        for ids in (prompt, new_token):
            expected = model(ids, past_key_values=eager_cache).logits
            got = compiled(ids, past_key_values=compiled_cache).logits
            assert ((got - expected).norm() / expected.norm()) < 1e-5
    assert int(compiled_cache.seen_tokens) == 8


def test_a_training_forward_compiles_as_one_graph():
    torch._dynamo.reset()
    model = tiny_model("hybrid").train()
    ids = random_ids(2, 9, seed=3)
    loss = torch.compile(model, fullgraph=True, backend="eager")(ids, labels=ids).loss
    loss.backward()
    expected = model(ids, labels=ids).loss
    assert abs(loss.item() - expected.item()) < 1e-5 * expected.item()


def sdpa_calls(monkeypatch) -> list[tuple]:
    """(attn_mask, is_causal) of every SDPA call from now on."""
    calls, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def spy(*args, attn_mask=None, is_causal=False, **kwargs):
        calls.append((attn_mask, is_causal))
        return sdpa(*args, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return calls


def test_a_compiled_forward_without_padding_packing_or_cache_leaves_the_causal_mask_to_sdpa(monkeypatch):
    """Compiled, transformers would build a (B, 1, S, S) mask, which keeps SDPA off its flash kernel; with nothing to
    mask but the future, the model passes is_causal instead, and the logits are those of an explicit causal mask."""
    torch._dynamo.reset()
    model = tiny_model("hybrid", attn_implementation="sdpa").train()
    ids = random_ids(3, 13, seed=4)
    calls = sdpa_calls(monkeypatch)
    got = torch.compile(model, fullgraph=True, backend="eager")(ids).logits
    assert len(calls) == 1 and calls[0][0] is None and calls[0][1]
    masked = tiny_model("hybrid", attn_implementation="eager").train()(ids).logits   # same weights, explicit mask
    assert ((got - masked).norm() / masked.norm()) < 1e-5


def test_a_compiled_forward_with_padding_still_hands_sdpa_the_mask(monkeypatch):
    torch._dynamo.reset()
    model = tiny_model("hybrid", attn_implementation="sdpa").train()
    ids, mask = random_ids(2, 11, seed=5), torch.ones(2, 11, dtype=torch.long)
    mask[0, :3] = 0
    calls = sdpa_calls(monkeypatch)
    torch.compile(model, fullgraph=True, backend="eager")(ids, attention_mask=mask)
    assert len(calls) == 1 and calls[0][0] is not None and not calls[0][1]


def test_a_compiled_model_keeps_packed_sequences_apart_and_trains_as_the_eager_one():
    """Where positions restart is read from their values, outside the compiled graph: the logits are those of the
    sequences run alone, for packings the graph has not seen too, and the gradients are the eager model's."""
    torch._dynamo.reset()
    model = tiny_model("hybrid").train()
    compiled = torch.compile(model, backend="aot_eager")
    ids = random_ids(2, 11, seed=6)
    for split in ([4, 7], [6, 2]):   # row 0 restarts at split[0], row 1 at split[1]
        position_ids = torch.stack([torch.cat([torch.arange(s), torch.arange(11 - s)]) for s in split])
        logits = compiled(ids, position_ids=position_ids).logits
        alone = torch.cat([
            torch.cat([model(ids[row:row + 1, :s]).logits, model(ids[row:row + 1, s:]).logits], dim=1)
            for row, s in enumerate(split)
        ])
        assert ((logits - alone).norm() / alone.norm()) < 1e-5

    compiled(ids, position_ids=position_ids, labels=ids).loss.backward()
    compiled_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(ids, position_ids=position_ids, labels=ids).loss.backward()
    for (name, p), got in zip(model.named_parameters(), compiled_grads):
        assert ((got - p.grad).norm() / p.grad.norm()) < 1e-5, name
