"""Decoding with the cache: piecewise forwards and generate give what one full forward and uncached generate give."""

import pytest
import torch

from helpers import KINDS, decode_in_pieces, left_pad, random_ids, tiny_model


@pytest.mark.parametrize(
    "kind, overrides",
    [("pure", {}), ("hybrid", {}), ("pure", {"m2rnn_conv_kernel_size": None}),
     ("hybrid", {"use_rope": True, "rope_parameters": {"rope_theta": 100.0}})],
    ids=["pure", "hybrid", "pure_no_conv", "hybrid_rope"],
)
def test_cached_decoding_matches_one_full_forward(kind, overrides):
    model = tiny_model(kind, **overrides)
    full, pieces, cache = decode_in_pieces(model, random_ids(2, 13))
    assert [cache.get_seq_length(i) for i in range(len(cache.layers))] == [13] * len(cache.layers)
    assert (pieces - full).abs().max() < 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_generate_is_the_same_with_and_without_the_cache(kind):
    model = tiny_model(kind)
    prompt = random_ids(2, 6, seed=1)
    for options in (
        dict(do_sample=False),
        dict(num_beams=3, num_return_sequences=2, do_sample=False),
    ):
        cached = model.generate(prompt, max_new_tokens=8, min_new_tokens=8, **options)
        uncached = model.generate(prompt, max_new_tokens=8, min_new_tokens=8, use_cache=False, **options)
        assert cached.shape == (prompt.shape[0] * options.get("num_return_sequences", 1), 14)
        assert torch.equal(cached, uncached), options


@pytest.mark.parametrize("kind", KINDS)
def test_generate_from_embeddings_gives_the_tokens_generate_from_ids_gives(kind):
    """`generate(inputs_embeds=...)` (soft prompts, other modalities) returns only the new tokens; they must be the
    ones the same prompt as token ids gets, in a left-padded batch too."""
    model = tiny_model(kind)
    # (without a mask, generate would infer one from the pad ids, and cannot from embeddings)
    for ids, attention_mask in ((random_ids(2, 5), None), left_pad([random_ids(n, seed=n) for n in (3, 7)])):
        from_ids = model.generate(ids, attention_mask=attention_mask, max_new_tokens=6, min_new_tokens=6)
        from_embeddings = model.generate(inputs_embeds=model.get_input_embeddings()(ids),
                                         attention_mask=attention_mask, max_new_tokens=6, min_new_tokens=6)
        assert torch.equal(from_embeddings, from_ids[:, ids.shape[1]:])


@pytest.mark.parametrize("kind", KINDS)
def test_sampling_and_continuing_from_a_returned_cache(kind):
    model = tiny_model(kind)
    prompt = random_ids(1, 5, seed=2)
    torch.manual_seed(7)
    sampled = model.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=True, top_k=0)
    torch.manual_seed(7)
    sampled_uncached = model.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=True, top_k=0,
                                      use_cache=False)
    assert torch.equal(sampled, sampled_uncached)

    first = model.generate(prompt, max_new_tokens=4, min_new_tokens=4, return_dict_in_generate=True)
    continued = model.generate(first.sequences, past_key_values=first.past_key_values, max_new_tokens=4,
                               min_new_tokens=4)
    in_one_go = model.generate(prompt, max_new_tokens=8, min_new_tokens=8)
    assert torch.equal(continued, in_one_go)
