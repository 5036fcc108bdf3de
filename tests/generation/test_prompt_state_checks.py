"""A prompt state belongs to one model and one prompt: loading it for another model, or continuing it without its
prompt, raises a ValueError that says what differs."""

import pytest
import torch

from modeling_m2rnn import M2RNNCache, load_prompt_state, save_prompt_state

from helpers import random_ids, tiny_model


@pytest.fixture(scope="module")
def hybrid_prompt_state(tmp_path_factory):
    """A hybrid's state after a prompt of 2 rows × 9 tokens."""
    model = tiny_model("hybrid")
    cache = M2RNNCache(model.config)
    with torch.no_grad():
        model(random_ids(2, 9, seed=6), past_key_values=cache)
    path = tmp_path_factory.mktemp("prompt") / "prompt.safetensors"
    save_prompt_state(cache, path)
    return path


@pytest.mark.parametrize(
    "kind, overrides, what_differs",
    [
        ("pure", {}, "layer 1 is an attention layer in the prompt state, but linear_attention"),
        ("hybrid", {"num_hidden_layers": 2, "layer_types": ["m2rnn", "full_attention"]},
         r"layers \[0, 1, 2\], the config has 2 layers"),
        ("hybrid", {"m2rnn_k_head_dim": 7}, "layer 0 conv_state has per-row shape \\(32, 3\\), the config gives"),
        ("hybrid", {"m2rnn_v_head_dim": 4, "m2rnn_conv_kernel_size": None}, "no convolution|has a convolution"),
        ("hybrid", {"m2rnn_num_v_heads": 2, "m2rnn_num_f_heads": 2}, "per-row shape"),
        ("hybrid", {"head_dim": 4}, r"layer 1 keys has per-row shape \(2, 8\), the config gives \(2, 4\)"),
    ],
    ids=["other_layer_kinds", "fewer_layers", "other_key_dim", "no_conv", "other_heads", "other_attention_dim"],
)
def test_a_prompt_state_of_another_model_is_refused_at_load(hybrid_prompt_state, kind, overrides, what_differs):
    config = tiny_model(kind, **overrides).config
    with pytest.raises(ValueError, match=what_differs):
        load_prompt_state(hybrid_prompt_state, config)


def test_a_prompt_state_of_another_dtype_is_refused_when_loaded_for_the_model(hybrid_prompt_state):
    model = tiny_model("hybrid").to(torch.bfloat16)
    with pytest.raises(ValueError, match="is torch.float32, where the model expects torch.bfloat16"):
        load_prompt_state(hybrid_prompt_state, model)
    loaded = load_prompt_state(hybrid_prompt_state, tiny_model("hybrid"))   # the model's own dtype loads
    assert loaded.get_seq_length() == 9


@pytest.mark.parametrize("new_tokens", [3, 9])
def test_generate_with_a_prompt_state_and_only_the_new_tokens_says_what_the_input_must_be(hybrid_prompt_state,
                                                                                          new_tokens):
    model = tiny_model("hybrid")
    cache = load_prompt_state(hybrid_prompt_state, model)
    with pytest.raises(ValueError, match="the cache holds 9 tokens, and `input_ids` must start with those 9"):
        model.generate(random_ids(2, new_tokens, seed=7), past_key_values=cache, max_new_tokens=2)


def test_generate_with_a_prompt_state_for_another_batch_size_is_refused(hybrid_prompt_state):
    model = tiny_model("hybrid")
    cache = load_prompt_state(hybrid_prompt_state, model)
    with pytest.raises(ValueError, match="a batch of 2 rows, the input has 1"):
        model.generate(random_ids(1, 12, seed=7), past_key_values=cache, max_new_tokens=2)
