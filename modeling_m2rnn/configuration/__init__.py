from .configuration_m2rnn import M2RNNConfig
from .presets import PRESETS

__all__ = ["M2RNNConfig", "PRESETS"]
