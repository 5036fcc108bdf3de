"""nn.Modules of the model. They know nothing of generation beyond the cache object they are handed."""

from .attention import Attention
from .linear import Linear
from .m2rnn import M2RNNMixer, PackedSequences, gated_rms_norm_torch
from .mlp import GatedMLP
from .moe import Experts, SparseMoeMLP, TopKRouter
from .norm import RMSNorm
from .short_conv import causal_conv1d

__all__ = ["Attention", "Experts", "GatedMLP", "Linear", "M2RNNMixer", "PackedSequences", "RMSNorm", "SparseMoeMLP",
           "TopKRouter", "causal_conv1d", "gated_rms_norm_torch"]
