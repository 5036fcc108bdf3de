from .cache import M2RNNCache
from .m2rnn import M2RNNForCausalLM, M2RNNForSequenceClassification, M2RNNModel, M2RNNPreTrainedModel

__all__ = ["M2RNNCache", "M2RNNForCausalLM", "M2RNNForSequenceClassification", "M2RNNModel", "M2RNNPreTrainedModel"]
