"""M2RNN for Hugging Face transformers. Importing the package registers the classes with the Auto factories."""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

from .configuration import PRESETS, M2RNNConfig
from .generation import M2RNNCache, M2RNNStaticCache, load_prompt_state, save_prompt_state
from .kernels import m2rnn_scan
from .models import M2RNNForCausalLM, M2RNNForSequenceClassification, M2RNNModel, M2RNNPreTrainedModel

AutoConfig.register(M2RNNConfig.model_type, M2RNNConfig, exist_ok=True)
AutoModel.register(M2RNNConfig, M2RNNModel, exist_ok=True)
AutoModelForCausalLM.register(M2RNNConfig, M2RNNForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(M2RNNConfig, M2RNNForSequenceClassification, exist_ok=True)

__version__ = "0.1.0"
__all__ = [
    "PRESETS",
    "M2RNNCache",
    "M2RNNStaticCache",
    "M2RNNConfig",
    "M2RNNForCausalLM",
    "M2RNNForSequenceClassification",
    "M2RNNModel",
    "M2RNNPreTrainedModel",
    "load_prompt_state",
    "m2rnn_scan",
    "save_prompt_state",
]
