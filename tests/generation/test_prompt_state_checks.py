"""A prompt state belongs to one model and one prompt: loading it for another model, or continuing it without its
prompt, raises a ValueError that says what differs."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from modeling_m2rnn import load_prompt_state, save_prompt_state

from helpers import cache_after, random_ids, tiny_model


@pytest.fixture(scope="module")
def hybrid_prompt_state(tmp_path_factory):
    """A hybrid's state after a prompt of 2 rows × 9 tokens."""
    model = tiny_model("hybrid")
    cache = cache_after(model, random_ids(2, 9, seed=6))
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


@pytest.fixture(scope="module")
def prompt_state_with_ids(tmp_path_factory):
    """A hybrid's state after a prompt of 2 rows × 9 tokens, saved with those tokens; and the prompt."""
    model, prompt = tiny_model("hybrid"), random_ids(2, 9, seed=6)
    cache = cache_after(model, prompt)
    path = tmp_path_factory.mktemp("prompt_ids") / "prompt.safetensors"
    save_prompt_state(cache, path, input_ids=prompt)
    return path, prompt


def test_a_prompt_state_saved_with_its_tokens_continues_only_an_input_that_starts_with_them(prompt_state_with_ids):
    path, prompt = prompt_state_with_ids
    model = tiny_model("hybrid")
    question = random_ids(2, 4, seed=8)
    expected = model.generate(torch.cat([prompt, question], dim=1), max_new_tokens=3, do_sample=False)
    continued = model.generate(torch.cat([prompt, question], dim=1), past_key_values=load_prompt_state(path, model),
                               max_new_tokens=3, do_sample=False)
    assert torch.equal(continued, expected)

    other_prompt = prompt.clone()
    other_prompt[1, 5] = other_prompt[1, 5] % 60 + 1   # another token at position 5 of the second row
    with pytest.raises(ValueError, match="must start with the 9 prompt tokens .* differ first at position 5"):
        model.generate(torch.cat([other_prompt, question], dim=1), past_key_values=load_prompt_state(path, model),
                       max_new_tokens=3)


def test_the_tokens_saved_with_a_prompt_state_must_be_the_ones_the_cache_has_seen(tmp_path):
    model = tiny_model("hybrid")
    cache = cache_after(model, random_ids(2, 9, seed=6))
    with pytest.raises(ValueError, match=r"\(batch, 9\) token ids: got shape \(2, 8\)"):
        save_prompt_state(cache, tmp_path / "state.safetensors", input_ids=random_ids(2, 8))
    assert not (tmp_path / "state.safetensors").exists()


def test_a_prompt_state_whose_tokens_do_not_fit_its_state_is_refused_at_load(prompt_state_with_ids, tmp_path):
    path, _ = prompt_state_with_ids
    with safe_open(str(path), framework="pt") as file:
        metadata, tensors = file.metadata(), {name: file.get_tensor(name) for name in file.keys()}
    tensors["input_ids"] = tensors["input_ids"][:, :7].contiguous()
    save_file(tensors, str(tmp_path / "edited.safetensors"), metadata=metadata)
    with pytest.raises(ValueError, match=r"input_ids have shape \(2, 7\), where the state has seen 9 tokens"):
        load_prompt_state(tmp_path / "edited.safetensors", tiny_model("hybrid"))


@pytest.mark.parametrize("new_tokens", [5, 12])
def test_only_the_new_tokens_under_a_mask_over_both_continue_a_prompt_state(prompt_state_with_ids, new_tokens):
    """Fewer or more new tokens than the prompt's 9: transformers 5.25 drops the all-ones mask before the generate
    hooks see it, and says in `next_sequence_length` that the whole input is new."""
    path, prompt = prompt_state_with_ids
    model = tiny_model("hybrid")
    question = random_ids(2, new_tokens, seed=8)
    expected = model.generate(torch.cat([prompt, question], dim=1), max_new_tokens=3, do_sample=False)
    continued = model.generate(question, attention_mask=torch.ones(2, 9 + new_tokens, dtype=torch.long),
                               past_key_values=load_prompt_state(path, model), max_new_tokens=3, do_sample=False)
    assert torch.equal(continued[:, -3:], expected[:, -3:])
