"""Decoding with the cache: piecewise forwards and generate give what one full forward and uncached generate give."""

import inspect

import pytest
import torch
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import LinearAttentionLayer

from modeling_m2rnn import M2RNNCache, M2RNNStaticCache

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


@pytest.mark.parametrize("kind", KINDS)
def test_a_cache_the_caller_builds_from_the_config_is_filled_in_place(kind):
    """transformers' way of reusing a prompt: fill a DynamicCache(config=...) with a forward, then generate from it.
    The caller's object becomes one of ours (it counts tokens) and is the one generate fills; a StaticCache the
    caller passes to generate likewise."""
    model = tiny_model(kind)
    prompt, question = random_ids(1, 6), random_ids(1, 3, seed=5)
    full = torch.cat([prompt, question], dim=1)
    greedy = model.generate(full, max_new_tokens=5, min_new_tokens=5)

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(prompt, past_key_values=cache)
    assert isinstance(cache, M2RNNCache) and cache.get_seq_length() == 6
    out = model.generate(full, past_key_values=cache, max_new_tokens=5, min_new_tokens=5, return_dict_in_generate=True)
    assert torch.equal(out.sequences, greedy) and out.past_key_values is cache and cache.get_seq_length() == 13

    static = StaticCache(config=model.config, max_cache_len=16)
    out = model.generate(full, past_key_values=static, max_new_tokens=5, min_new_tokens=5, return_dict_in_generate=True)
    assert torch.equal(out.sequences, greedy) and out.past_key_values is static
    assert isinstance(static, M2RNNStaticCache)


def test_a_cache_this_model_cannot_use_is_refused_by_what_is_wrong():
    model = tiny_model("hybrid")
    ids = random_ids(1, 4)
    with pytest.raises(ValueError, match=r"not built for this model's layers .*config=model.config"):
        model(ids, past_key_values=DynamicCache())   # layers made lazily, all of them attention layers
    filled_elsewhere = DynamicCache(config=model.config)
    filled_elsewhere.update(torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8), layer_idx=1)
    with pytest.raises(ValueError, match="already holds tokens this model did not count"):
        model.generate(ids, past_key_values=filled_elsewhere, max_new_tokens=2)
    for implementation in ("offloaded", "offloaded_static"):
        with pytest.raises(ValueError, match="offloading caches"):
            model.generate(ids, cache_implementation=implementation, max_new_tokens=2)


# transformers 5.25 rolls recurrent layers back after rejected drafts, from the states they recorded; before, it refused
# assisted decoding for models with recurrent state.
ROLLS_BACK_RECURRENT_STATES = "recurrent_states_to_keep" in inspect.signature(
    LinearAttentionLayer.activate_past_recording).parameters


GATED_DELTANET_HYBRID = dict(layer_types=["gated_deltanet", "m2rnn", "full_attention"], gdn_num_heads=2,
                             gdn_key_head_dim=8, gdn_value_head_dim=16, gdn_conv_kernel_size=4)


@pytest.mark.parametrize(
    "kind, overrides, drafts",
    [("pure", {}, "assistant_model"), ("pure", {}, "prompt_lookup"), ("hybrid", {}, "assistant_model"),
     ("hybrid", {}, "prompt_lookup"), ("hybrid", GATED_DELTANET_HYBRID, "assistant_model"),
     ("hybrid", {"m2rnn_kernel_backend": "triton"}, "prompt_lookup")],
    ids=["pure-assistant", "pure-lookup", "hybrid-assistant", "hybrid-lookup", "gated_deltanet-assistant",
         "triton-lookup"],
)
def test_assisted_decoding_gives_the_greedy_tokens(kind, overrides, drafts, monkeypatch):
    """Drafts from another model or from the prompt's n-grams are checked in one forward, and the rejected ones are
    rolled back: the tokens must be greedy decoding's, and the returned cache must continue like greedy's."""
    model = tiny_model(kind, **overrides)
    prompt = random_ids(1, 4, seed=3).repeat(1, 3)   # repeats, so that prompt lookup finds drafts
    options = (dict(assistant_model=tiny_model(kind, seed=1, **overrides)) if drafts == "assistant_model"
               else dict(prompt_lookup_num_tokens=3))
    greedy = model.generate(prompt, max_new_tokens=16, min_new_tokens=16)
    if not ROLLS_BACK_RECURRENT_STATES:
        with pytest.raises(ValueError, match="stateful"):
            model.generate(prompt, max_new_tokens=10, **options)
        return

    rolled_back = []
    crop = M2RNNCache.crop
    monkeypatch.setattr(M2RNNCache, "crop", lambda cache, n: (rolled_back.append(-n), crop(cache, n))[1])
    out = model.generate(prompt, max_new_tokens=10, min_new_tokens=10, return_dict_in_generate=True, **options)
    assert torch.equal(out.sequences, greedy[:, :prompt.shape[1] + 10])
    assert max(rolled_back) > 0   # some drafts were rejected
    assert out.past_key_values.get_seq_length() == out.sequences.shape[1] - 1
    continued = model.generate(out.sequences, past_key_values=out.past_key_values, max_new_tokens=6, min_new_tokens=6)
    assert torch.equal(continued, greedy)


def test_assisted_decoding_over_a_static_cache_is_refused():
    model = tiny_model("hybrid")
    prompt = random_ids(1, 4, seed=3).repeat(1, 3)
    with pytest.raises(ValueError, match="cropped" if ROLLS_BACK_RECURRENT_STATES else "stateful"):
        model.generate(prompt, max_new_tokens=10, cache_implementation="static", prompt_lookup_num_tokens=3)
