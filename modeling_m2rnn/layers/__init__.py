"""nn.Modules of the model. They call the ops of `kernels` and reach a generation cache only through the accessors
of `generation.cache`."""

from .attention import Attention
from .gated_deltanet import GatedDeltaNet
from .linear import Linear
from .m2rnn_mixer import M2RNNMixer
from .mlp import GatedMLP
from .moe import Experts, SparseMoeMLP, TopKRouter
from .norm import RMSNorm
from .packing import PackedSequences

__all__ = ["Attention", "Experts", "GatedDeltaNet", "GatedMLP", "Linear", "M2RNNMixer", "PackedSequences", "RMSNorm",
           "SparseMoeMLP", "TopKRouter"]
