"""Models with Gated DeltaNet layers end to end on the CPU: config, cache, generation, padding, packing, checkpoints."""


import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError

from modeling_m2rnn import M2RNNCache, M2RNNConfig, M2RNNForCausalLM, load_prompt_state, save_prompt_state

from helpers import REMOTE_CODE_INPUT, cache_after, decode_in_pieces, logits_through_remote_code

MIXER_LETTERS = {"G": "gated_deltanet", "M": "m2rnn", "A": "full_attention"}


def tiny_config(pattern: str = "GMA", **overrides) -> M2RNNConfig:
    """A tiny model whose layers are spelled by letters: G = Gated DeltaNet, M = M2RNN, A = attention."""
    fields = {
        "vocab_size": 61, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": len(pattern),
        "layer_types": [MIXER_LETTERS[letter] for letter in pattern],
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "m2rnn_k_head_dim": 6, "m2rnn_v_head_dim": 5, "m2rnn_num_v_heads": 4, "m2rnn_num_f_heads": 4,
        "m2rnn_num_g_heads": 2, "m2rnn_num_weight_heads": 2, "m2rnn_conv_kernel_size": 3,
        "gdn_num_heads": 2, "gdn_key_head_dim": 8, "gdn_value_head_dim": 16, "gdn_conv_kernel_size": 4,
        "initializer_range": 0.2,   # larger than a real model's, so that logits are far from ties
        "pad_token_id": 0,
    }
    return M2RNNConfig(**{**fields, **overrides})


def tiny_model(pattern: str = "GMA", seed: int = 0, **overrides) -> M2RNNForCausalLM:
    torch.manual_seed(seed)
    return M2RNNForCausalLM(tiny_config(pattern, **overrides)).eval()


def random_ids(*shape, seed=0):
    return torch.randint(1, 61, shape, generator=torch.Generator().manual_seed(seed))


def test_layer_types_name_the_mixers_and_old_configs_load_unchanged():
    config = tiny_config("GMA")
    assert config.layer_types == ["linear_attention", "linear_attention", "full_attention"]
    assert config.mixer_types == ["gated_deltanet", "m2rnn", "attention"]
    old = M2RNNConfig(num_hidden_layers=2, layer_types=["linear_attention", "full_attention"])
    assert old.mixer_types == ["m2rnn", "attention"]
    from_mixers = M2RNNConfig(num_hidden_layers=2, mixer_types=["gated_deltanet", "attention"])
    assert from_mixers.layer_types == ["linear_attention", "full_attention"]
    reloaded = M2RNNConfig.from_dict(config.to_dict())
    assert (reloaded.layer_types, reloaded.mixer_types) == (config.layer_types, config.mixer_types)
    layers = tiny_model("GMA").model.layers
    assert [hasattr(layers[0], "gated_deltanet"), hasattr(layers[1], "m2rnn"), hasattr(layers[2], "self_attn")] == [
        True, True, True
    ]


@pytest.mark.parametrize(
    "fields, field_named",
    [
        ({"num_hidden_layers": 2, "mixer_types": ["m2rnn"]}, "mixer_types"),
        ({"num_hidden_layers": 2, "mixer_types": ["m2rnn", "mamba2"]}, "mixer_types"),
        ({"num_hidden_layers": 2, "layer_types": ["gated_deltanet", "full_attention"],
          "mixer_types": ["m2rnn", "attention"]}, r"mixer_types\[0\]"),
        ({"num_hidden_layers": 1, "layer_types": ["linear_attention"], "mixer_types": ["attention"]},
         r"mixer_types\[0\]"),
        ({"num_hidden_layers": 1, "mixer_types": ["gated_deltanet"], "gdn_num_heads": 0}, "gdn_num_heads"),
        ({"num_hidden_layers": 1, "mixer_types": ["gated_deltanet"], "gdn_key_head_dim": -1}, "gdn_key_head_dim"),
        ({"num_hidden_layers": 1, "mixer_types": ["gated_deltanet"], "gdn_value_head_dim": 0}, "gdn_value_head_dim"),
        ({"num_hidden_layers": 1, "mixer_types": ["gated_deltanet"], "gdn_num_heads": 3, "gdn_num_k_heads": 2},
         "gdn_num_k_heads"),
        ({"num_hidden_layers": 1, "mixer_types": ["gated_deltanet"], "gdn_conv_kernel_size": 1},
         "gdn_conv_kernel_size"),
        ({"num_hidden_layers": 1, "mixer_types": ["gated_deltanet"], "gdn_backend": "triton"}, "gdn_backend"),
    ],
)
def test_a_gdn_config_that_cannot_work_names_the_field(fields, field_named):
    with pytest.raises(StrictDataclassClassValidationError, match=f"`{field_named}") as error:
        M2RNNConfig(**fields)
    assert isinstance(error.value.__cause__, ValueError)


@pytest.mark.parametrize("pattern", ["GMA", "GG"])
def test_cached_decoding_matches_one_full_forward(pattern):
    model = tiny_model(pattern)
    full, pieces, cache = decode_in_pieces(model, random_ids(2, 13))
    assert cache.layers[0].recurrent_states[0].shape == (2, 2, 8, 16)                         # (B, H, K, V)
    assert cache.layers[0].recurrent_states[0].dtype == torch.float32
    assert (pieces - full).abs().max() < 1e-4


def test_generate_is_the_same_with_and_without_the_cache_and_beam_search_runs():
    model = tiny_model("GMA")
    prompt = random_ids(2, 6, seed=1)
    greedy = {"max_new_tokens": 7, "min_new_tokens": 7, "do_sample": False}
    assert torch.equal(model.generate(prompt, **greedy), model.generate(prompt, use_cache=False, **greedy))
    beams = model.generate(prompt, num_beams=3, num_return_sequences=2, max_new_tokens=5, min_new_tokens=5)
    assert beams.shape == (4, 11)


def test_a_left_padded_batch_equals_the_rows_alone():
    model = tiny_model("GMA", seed=1)
    short, long = random_ids(4, seed=2), random_ids(9, seed=3)
    ids = torch.stack([torch.cat([torch.zeros(5, dtype=torch.long), short]), long])
    mask = (ids != 0).long()
    with torch.no_grad():
        batch = model(ids, attention_mask=mask).logits
        assert (batch[0, 5:] - model(short[None]).logits[0]).abs().max() < 1e-5
        assert (batch[1] - model(long[None]).logits[0]).abs().max() < 1e-5
    generated = model.generate(ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4)
    assert torch.equal(generated[0, -4:], model.generate(short[None], max_new_tokens=4, min_new_tokens=4)[0, -4:])


def test_packed_rows_equal_the_rows_alone():
    model = tiny_model("GMA", seed=2)
    rows = [random_ids(n, seed=n) for n in (5, 3, 6)]
    position_ids = torch.cat([torch.arange(len(row)) for row in rows])[None]
    with torch.no_grad():
        packed = model(torch.cat(rows)[None], position_ids=position_ids, use_cache=False).logits[0]
        alone = torch.cat([model(row[None]).logits[0] for row in rows])
    assert (packed - alone).abs().max() < 1e-5


def test_a_training_step_reaches_every_gdn_parameter():
    model = tiny_model("GA").train()
    ids = random_ids(2, 10, seed=4)
    model(ids, labels=ids).loss.backward()
    for name, parameter in model.model.layers[0].gated_deltanet.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0 and parameter.grad.isfinite().all(), name


def test_save_and_load_are_bit_identical_and_keep_the_decay_in_float32(tmp_path):
    model = tiny_model("GMA", seed=3)
    model.save_pretrained(tmp_path)
    reloaded = M2RNNForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.mixer_types == model.config.mixer_types
    for (name, parameter), (_, loaded) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(parameter, loaded), name
    ids = random_ids(2, 7, seed=5)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    half = M2RNNForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    mixer = half.model.layers[0].gated_deltanet
    assert mixer.A_log.dtype == mixer.dt_bias.dtype == torch.float32 and mixer.o_proj.weight.dtype == torch.bfloat16


def test_a_saved_prompt_state_continues_generation(tmp_path):
    model = tiny_model("GMA", seed=4)
    prompt = random_ids(2, 6, seed=6)
    cache = cache_after(model, prompt)
    save_prompt_state(cache, tmp_path / "state.safetensors")
    loaded = load_prompt_state(tmp_path / "state.safetensors", model.config)
    question = torch.cat([prompt, random_ids(2, 3, seed=7)], dim=1)   # the prompt, then new tokens
    continued = model.generate(question, past_key_values=loaded, max_new_tokens=5, min_new_tokens=5)
    assert torch.equal(continued, model.generate(question, max_new_tokens=5, min_new_tokens=5))


def test_the_triton_conv_kernels_give_the_pytorch_conv_in_training_and_decoding():
    """With m2rnn_kernel_backend="triton" the GDN layer's short conv runs on the package's Triton kernels (here the
    Triton interpreter): whole rows in training, one token after the cached window in decoding."""
    torch_model = tiny_model("G", seed=5)
    triton_model = tiny_model("G", seed=5, m2rnn_kernel_backend="triton")
    ids = random_ids(2, 8, seed=7)
    losses = [model.train()(ids, labels=ids).loss for model in (torch_model, triton_model)]
    for loss in losses:
        loss.backward()
    assert (losses[0] - losses[1]).abs() < 1e-5
    grads = [model.model.layers[0].gated_deltanet.conv_weight.grad for model in (torch_model, triton_model)]
    assert (grads[0] - grads[1]).abs().max() < 1e-5 * grads[0].abs().max()
    with torch.no_grad():
        full = torch_model.eval()(ids).logits
        cache = M2RNNCache(triton_model.config)
        pieces = [triton_model.eval()(ids[:, :5], past_key_values=cache, use_cache=True).logits]
        pieces += [triton_model(ids[:, t : t + 1], past_key_values=cache).logits for t in range(5, 8)]
    assert (torch.cat(pieces, dim=1) - full).abs().max() < 1e-4


def test_a_gdn_checkpoint_loads_with_trust_remote_code_without_the_package_or_fla(tmp_path):
    model = tiny_model("GMA", seed=6)
    model.save_pretrained(tmp_path / "checkpoint")
    got = logits_through_remote_code(tmp_path / "checkpoint", tmp_path)
    with torch.no_grad():
        expected = model(torch.tensor(REMOTE_CODE_INPUT)).logits
    assert torch.equal(got, expected)
