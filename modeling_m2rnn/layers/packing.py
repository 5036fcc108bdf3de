"""Sequences packed along the time axis of a batch, as the model finds them from restarting position ids."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PackedSequences:
    """Where sequences packed along the time axis begin, shared by every recurrent layer of one forward pass.

    The rows of the batch are laid end to end on one time axis of length B·S, so that each row start and
    each restart inside a row begins a sequence of its own.
    """

    cu_seqlens: torch.Tensor          # (num_sequences + 1,) int32, boundaries on the flattened B·S axis
    first_sequence: torch.Tensor      # (B,) index of each row's first sequence: it continues the cached state
    last_sequence: torch.Tensor       # (B,) index of each row's last sequence: its final state is the row's
    sequence_ids: torch.Tensor        # (B, S) 0, 0, 1, 1, 1, 2, ...: which sequence of its row each token is in

    @classmethod
    def from_sequence_ids(cls, sequence_ids: torch.Tensor) -> "PackedSequences":
        """`sequence_ids` (B, S): 0, 0, 1, 1, 1, 2, ... counting the sequences of each row from 0."""
        batch, seq_len = sequence_ids.shape
        is_start = torch.ones_like(sequence_ids, dtype=torch.bool)
        is_start[:, 1:] = sequence_ids[:, 1:] != sequence_ids[:, :-1]
        starts = is_start.flatten().nonzero().squeeze(-1)
        cu_seqlens = F.pad(starts, (0, 1), value=batch * seq_len).to(torch.int32)
        sequences_per_row = is_start.sum(dim=1)
        last_sequence = sequences_per_row.cumsum(0) - 1
        first_sequence = last_sequence - sequences_per_row + 1

        return cls(cu_seqlens, first_sequence, last_sequence, sequence_ids)

    def flatten(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, ...) → (1, B·S, ...): the rows laid end to end, the layout `cu_seqlens` indexes."""
        return x.reshape(1, x.shape[0] * x.shape[1], *x.shape[2:])

    def start_states(self, initial_state: torch.Tensor | None) -> torch.Tensor | None:
        """The start state of every sequence (num_sequences, ...): a row's cached state (B, ...) for its first
        sequence, zeros for the sequences that restart inside a row."""
        if initial_state is None:
            return None
        states = initial_state.new_zeros(self.cu_seqlens.numel() - 1, *initial_state.shape[1:])
        return states.index_copy(0, self.first_sequence, initial_state)
