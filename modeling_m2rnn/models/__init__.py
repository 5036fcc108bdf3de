from .modeling_m2rnn import M2RNNForCausalLM, M2RNNForSequenceClassification, M2RNNModel, M2RNNPreTrainedModel

__all__ = [
    "M2RNNForCausalLM",
    "M2RNNForSequenceClassification",
    "M2RNNModel",
    "M2RNNPreTrainedModel",
]
