"""Input the model cannot use raises a ValueError naming the argument and the rule, instead of an error deep inside
a layer or a silently wrong answer; unusual input that has a right answer gets it."""

import pytest
import torch

from modeling_m2rnn import M2RNNCache, m2rnn_scan

from helpers import random_ids, tiny_model

KINDS = ["pure", "hybrid"]


@pytest.mark.parametrize("kind", KINDS)
def test_an_attention_mask_of_another_batch_size_names_both_shapes(kind):
    model = tiny_model(kind)
    ids = random_ids(2, 6)
    with pytest.raises(ValueError, match=r"`attention_mask`.*\(1, 6\).*\(2, 6\)"):
        model(ids, attention_mask=torch.ones(1, 6, dtype=torch.long))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mask_length", [4, 8])
def test_without_a_cache_the_attention_mask_must_be_as_long_as_the_input(kind, mask_length):
    model = tiny_model(kind)
    mask = torch.ones(2, mask_length, dtype=torch.long)
    mask[0, 0] = 0
    with pytest.raises(ValueError, match=f"`attention_mask` has length {mask_length} but must cover the 6 input"):
        model(random_ids(2, 6), attention_mask=mask, use_cache=False)


@pytest.mark.parametrize("kind", KINDS)
def test_with_a_cache_the_attention_mask_covers_the_cached_and_the_new_tokens(kind):
    model = tiny_model(kind)
    ids = random_ids(2, 9, seed=1)
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits[:, 5:]
        cache = M2RNNCache(model.config)
        model(ids[:, :5], attention_mask=torch.ones(2, 5, dtype=torch.long), past_key_values=cache)
        with pytest.raises(ValueError, match="must cover the 5 cached tokens and the 4 new ones: 9"):
            model(ids[:, 5:], attention_mask=torch.ones(2, 4, dtype=torch.long), past_key_values=cache)
        continued = model(ids[:, 5:], attention_mask=torch.ones(2, 9, dtype=torch.long), past_key_values=cache)
    assert ((continued.logits - expected).norm() / expected.norm()) < 1e-5


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("value", [0.5, 2.0, -1.0])
def test_an_attention_mask_of_other_values_than_zero_and_one_is_refused(kind, value):
    """The M2RNN layers would scale q, k, v by such a value while attention reads it as a boolean."""
    model = tiny_model(kind)
    mask = torch.ones(2, 6)
    mask[1, 2] = value
    with pytest.raises(ValueError, match="`attention_mask` must hold only 0 \\(padding\\) and 1"):
        model(random_ids(2, 6), attention_mask=mask)


def test_a_boolean_or_float_mask_of_zeros_and_ones_means_what_a_long_one_does():
    model = tiny_model("hybrid")
    ids = random_ids(2, 6, seed=2)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        for same_mask in (mask.bool(), mask.float()):
            assert torch.equal(model(ids, attention_mask=same_mask).logits, expected)


@pytest.mark.parametrize("shape", [(1, 0), (0, 5)], ids=["no_tokens", "no_rows"])
def test_an_empty_input_is_refused(shape):
    model = tiny_model("hybrid")
    with pytest.raises(ValueError, match="the input is empty"):
        model(torch.zeros(shape, dtype=torch.long))
    with pytest.raises(ValueError, match="the input is empty"):
        model(inputs_embeds=torch.zeros(*shape, 32))


@pytest.mark.parametrize(
    "position_ids, rule",
    [
        (torch.arange(6.0)[None], "integer tensor"),
        (torch.ones(1, 6, dtype=torch.bool), "integer tensor"),
        (torch.arange(6), r"\(batch, seq_len\)"),
        (torch.arange(5)[None], r"\(batch, seq_len\)"),
        (torch.arange(6).expand(3, 6), r"\(batch, seq_len\)"),
        (torch.arange(6)[None, None], r"\(batch, seq_len\)"),
    ],
    ids=["float", "bool", "1d", "short", "other_batch", "3d"],
)
@pytest.mark.parametrize("kind", KINDS)
def test_position_ids_must_be_integers_of_the_inputs_shape(kind, position_ids, rule):
    model = tiny_model(kind)
    with pytest.raises(ValueError, match=f"`position_ids` must be.*{rule}"):
        model(random_ids(2, 6), position_ids=position_ids)


def test_packed_sequences_in_eval_mode_get_the_right_answer_in_a_hybrid():
    """By default the model builds a cache in eval mode, and transformers' attention masks ignore packing once there
    is a cache: the second sequence attended to the first. Packed rows get no default cache."""
    model = tiny_model("hybrid")
    first, second = random_ids(1, 5, seed=3), random_ids(1, 4, seed=4)
    packed_ids = torch.cat([first, second], dim=1)
    position_ids = torch.cat([torch.arange(5), torch.arange(4)])[None]
    with torch.no_grad():
        out = model(packed_ids, position_ids=position_ids)
        alone = torch.cat([model(first).logits, model(second).logits], dim=1)
    assert ((out.logits - alone).norm() / alone.norm()) < 1e-5
    assert out.past_key_values is None


def test_packed_sequences_with_a_cache_in_a_hybrid_are_refused():
    model = tiny_model("hybrid")
    position_ids = torch.cat([torch.arange(5), torch.arange(4)])[None]
    with pytest.raises(ValueError, match="packed sequences.*cache"):
        model(random_ids(1, 9), position_ids=position_ids, past_key_values=M2RNNCache(model.config))


@pytest.mark.parametrize("kind", KINDS)
def test_a_cache_filled_for_one_batch_size_refuses_another(kind):
    model = tiny_model(kind)
    cache = M2RNNCache(model.config)
    with torch.no_grad():
        model(random_ids(2, 5), past_key_values=cache)
        with pytest.raises(ValueError, match="the cache holds the state of a batch of 2 rows, the input has 3"):
            model(random_ids(3, 1), past_key_values=cache)


def test_the_triton_backend_on_cpu_tensors_without_the_interpreter_names_the_remedy(monkeypatch):
    """tests/conftest.py sets TRITON_INTERPRET=1 for the suite; a user's CPU process has no such variable."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = tiny_model("pure", m2rnn_scan_backend="triton")
    with pytest.raises(ValueError, match="needs CUDA tensors, or TRITON_INTERPRET=1"):
        model(random_ids(1, 4))
    q = k = torch.randn(1, 3, 1, 4)
    with pytest.raises(ValueError, match="needs CUDA tensors, or TRITON_INTERPRET=1"):
        m2rnn_scan(q, k, torch.randn(1, 3, 2, 5), torch.randn(2, 5, 5), torch.rand(1, 3, 2), backend="triton")
