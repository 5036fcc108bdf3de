"""A recurrent layer's recurrence over one forward, continued from the layer's cached state and stored back into it,
shared by the M2RNN and the Gated DeltaNet mixers."""

import torch

from ..generation.cache import recurrent_state, states_to_record, update_recurrent_state
from .packing import PackedSequences


def cached_recurrence(recurrence, inputs: tuple, packed: PackedSequences | None, cache, layer_idx: int) -> torch.Tensor:
    """The output (B, S, ...) of `recurrence(*inputs, initial_state, packed)` → (output, final state), every input
    (B, S, ...), run from the cached state of layer `layer_idx` (zero without a cache or before its first forward);
    the cache then holds the final state.

    A cache that records its past so that generate can roll it back (assisted decoding) also takes the states after
    each of the forward's last steps (generation.cache.states_to_record): those steps then run one at a time, after
    the others at once, in as many calls of the recurrence."""
    initial_state = recurrent_state(cache, layer_idx)
    count = states_to_record(cache, layer_idx)
    if not count:
        output, final_state = recurrence(*inputs, initial_state, packed)
        if cache is not None:
            update_recurrent_state(cache, layer_idx, final_state)
        return output
    if packed is not None:
        raise ValueError("a cache that records its past (assisted decoding) takes one sequence per row, not packed")

    seq_len = inputs[0].shape[1]
    first = max(seq_len - count, 0)   # the steps before `first` run at once
    outputs, states, state = [], [], initial_state
    if first:
        output, state = recurrence(*(x[:, :first] for x in inputs), state, None)
        outputs.append(output)
    for t in range(first, seq_len):
        output, state = recurrence(*(x[:, t:t + 1] for x in inputs), state, None)
        outputs.append(output)
        states.append(state)
    update_recurrent_state(cache, layer_idx, states)
    return torch.cat(outputs, dim=1)
