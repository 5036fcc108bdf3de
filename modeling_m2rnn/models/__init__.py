from .cache import M2RNNCache, M2RNNStaticCache, load_prompt_state, save_prompt_state
from .m2rnn import M2RNNForCausalLM, M2RNNForSequenceClassification, M2RNNModel, M2RNNPreTrainedModel

__all__ = [
    "M2RNNCache",
    "M2RNNForCausalLM",
    "M2RNNForSequenceClassification",
    "M2RNNModel",
    "M2RNNPreTrainedModel",
    "M2RNNStaticCache",
    "load_prompt_state",
    "save_prompt_state",
]
