"""The paper's models (arXiv 2603.14360, Table of 400M models), as `M2RNNConfig` keyword arguments."""

_M2RNN_400M = dict(
    vocab_size=100352,
    hidden_size=1024,
    intermediate_size=2752,
    num_hidden_layers=24,
    num_attention_heads=16,
    num_key_value_heads=16,
    head_dim=64,
    m2rnn_k_head_dim=64,
    m2rnn_v_head_dim=16,
    m2rnn_num_q_heads=1,
    m2rnn_num_k_heads=1,
    m2rnn_num_v_heads=84,
    m2rnn_num_f_heads=84,
    m2rnn_num_g_heads=84,
    m2rnn_num_weight_heads=84,
    m2rnn_conv_kernel_size=4,
)

# Attention layers of the hybrid, counted from 0.
_HYBRID_400M_ATTENTION_LAYERS = (4, 12, 20)

PRESETS = {
    "m2rnn-400m": {**_M2RNN_400M, "layer_types": ["linear_attention"] * 24},
    "hybrid-m2rnn-400m": {
        **_M2RNN_400M,
        "layer_types": [
            "full_attention" if i in _HYBRID_400M_ATTENTION_LAYERS else "linear_attention" for i in range(24)
        ],
    },
}
