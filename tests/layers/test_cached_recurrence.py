"""layers/cached_recurrence.py: the recurrence over a forward, from and into the cache, with the per-step states a
cache that records its past takes (assisted decoding: tests/generation/test_cached_decoding.py runs it in generate)."""

from types import SimpleNamespace

import pytest
import torch

from modeling_m2rnn.layers.cached_recurrence import cached_recurrence
from modeling_m2rnn.layers.packing import PackedSequences


def running_sum(x, state, packed):
    """A recurrence whose state after step t is the sum of x up to t (from `state`): out (B, S, D), state (B, D)."""
    out = x.cumsum(dim=1) + (0 if state is None else state[:, None])
    return out, out[:, -1]


class RecordingCache:
    """What cached_recurrence reads of a transformers cache: one layer that records its past, and its state."""

    def __init__(self, states_to_keep):
        self.layers = [SimpleNamespace(record_past=True, recurrent_states_to_keep=states_to_keep,
                                       is_recurrent_states_initialized=[False], recurrent_states=[None],
                                       has_previous_state=[False])]
        self.stored = []

    def update_recurrent_state(self, states, layer_idx):
        self.stored.append(states)
        layer = self.layers[layer_idx]
        layer.recurrent_states[0] = states[-1] if isinstance(states, list) else states
        layer.is_recurrent_states_initialized[0] = True


@pytest.mark.parametrize("seq_len, states_to_keep", [(9, 3), (4, 3), (2, 5), (1, 1)])
def test_a_recording_cache_gets_the_states_after_each_of_the_last_steps(seq_len, states_to_keep):
    """A roll-back of up to `states_to_keep` steps needs the states after the last states_to_keep + 1 steps (the
    earliest is where the longest roll-back lands); fewer when the forward is shorter. Outputs are unchanged."""
    x = torch.randn(2, seq_len, 3, dtype=torch.float64)
    start = torch.randn(2, 3, dtype=torch.float64)
    cache = RecordingCache(states_to_keep)
    cache.layers[0].recurrent_states[0], cache.layers[0].is_recurrent_states_initialized[0] = start, True

    out = cached_recurrence(running_sum, (x,), None, cache, layer_idx=0)
    expected, _ = running_sum(x, start, None)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    (states,) = cache.stored
    kept = min(seq_len, states_to_keep + 1)
    assert len(states) == kept
    for state, step in zip(states, range(seq_len - kept, seq_len)):
        torch.testing.assert_close(state, expected[:, step], rtol=1e-12, atol=1e-12)
    assert cache.layers[0].has_previous_state[0]


def test_without_recording_the_cache_gets_the_final_state_once():
    x = torch.randn(2, 5, 3)
    cache = RecordingCache(3)
    cache.layers[0].record_past = False
    out = cached_recurrence(running_sum, (x,), None, cache, layer_idx=0)
    (final,) = cache.stored
    assert torch.equal(final, out[:, -1])


def test_packed_sequences_into_a_recording_cache_are_refused():
    packed = PackedSequences.from_sequence_ids(torch.tensor([[0, 0, 1, 1]]))
    with pytest.raises(ValueError, match="one sequence per row"):
        cached_recurrence(running_sum, (torch.randn(1, 4, 3),), packed, RecordingCache(2), layer_idx=0)
