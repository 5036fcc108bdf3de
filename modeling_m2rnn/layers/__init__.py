"""nn.Modules of the model. They know nothing of generation beyond the cache object they are handed."""

from .attention import Attention
from .gated_deltanet import GatedDeltaNet
from .linear import Linear
from .m2rnn import M2RNNMixer, PackedSequences, gated_rms_norm_torch
from .short_conv import causal_conv1d
from .mlp import GatedMLP
from .norm import RMSNorm

__all__ = ["Attention", "GatedDeltaNet", "GatedMLP", "Linear", "M2RNNMixer", "PackedSequences", "RMSNorm", "causal_conv1d",
           "gated_rms_norm_torch"]
