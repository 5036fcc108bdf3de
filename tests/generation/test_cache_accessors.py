"""The accessors through which layers read and write their part of a generation cache (generation/cache.py)."""

import torch

from modeling_m2rnn import M2RNNCache, M2RNNStaticCache
from modeling_m2rnn.generation.cache import (
    conv_state,
    has_previous_state,
    recurrent_state,
    set_conv_state,
    update_recurrent_state,
)

from helpers import cache_after, random_ids, tiny_model


def test_accessors_read_nothing_before_the_prompt_and_the_layer_state_after_it():
    model = tiny_model("hybrid")   # M2RNN layers 0 and 2: state (B, N=4, K=6, V=5), window (B, C=32, k=3)
    for cache in (M2RNNCache(model.config), M2RNNStaticCache(model.config, max_cache_len=12)):
        assert conv_state(None, 0) is None and recurrent_state(None, 0) is None and not has_previous_state(None, 0)
        assert conv_state(cache, 0) is None and recurrent_state(cache, 0) is None and not has_previous_state(cache, 0)
        ids = random_ids(2, 7)
        with torch.no_grad():
            model(ids, past_key_values=cache)
        for layer in (0, 2):
            assert has_previous_state(cache, layer)
            assert recurrent_state(cache, layer).shape == (2, 4, 6, 5)
            assert recurrent_state(cache, layer).dtype == torch.float32
            assert conv_state(cache, layer).shape == (2, 32, 3)


def test_writes_are_in_place_so_a_static_cache_keeps_its_addresses():
    model = tiny_model("pure", m2rnn_conv_kernel_size=None)
    cache = M2RNNStaticCache(model.config, max_cache_len=9)
    with torch.no_grad():
        model(random_ids(1, 4), past_key_values=cache)
    state = recurrent_state(cache, 1)
    new_state = torch.rand_like(state)
    update_recurrent_state(cache, 1, new_state)
    assert recurrent_state(cache, 1).data_ptr() == state.data_ptr()
    assert torch.equal(recurrent_state(cache, 1), new_state)
    assert has_previous_state(cache, 1) and conv_state(cache, 1) is None   # no conv: the state alone marks it

    model = tiny_model("pure")
    cache = cache_after(model, random_ids(1, 4))
    window = conv_state(cache, 0)
    new_window = torch.randn_like(window)
    set_conv_state(cache, 0, new_window)
    assert conv_state(cache, 0).data_ptr() == window.data_ptr() and torch.equal(conv_state(cache, 0), new_window)
