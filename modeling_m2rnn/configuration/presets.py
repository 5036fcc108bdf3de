"""The paper's models (arXiv 2603.14360: its 400M and 7B MoE experiments, as its public lm-engine training configs
build them), as `M2RNNConfig` keyword arguments.

Layer letters in the names below: M = M2RNN, G = Gated DeltaNet, A = softmax attention (NoPE). Layers count from 0.

| family                               | 400M (24 layers, hidden 1024)   | 7B MoE (40 layers, hidden 1536)       |
|--------------------------------------|---------------------------------|---------------------------------------|
| m2rnn                                | all M                           | all M                                 |
| hybrid-m2rnn                         | A at 4, 12, 20; M elsewhere     | A at 4, 12, 20, 28, 36; M elsewhere   |
| hybrid-gated-deltanet                | A at 4, 12, 20; G elsewhere     | A at 4, 12, 20, 28, 36; G elsewhere   |
| hybrid-gated-deltanet-m2rnn-1l       | M at 0, A as above, G elsewhere | M at 0, A as above, G elsewhere       |
| hybrid-gated-deltanet-m2rnn-3l / -5l | M at 3, 11, 19 (400M, -3l)      | M at 3, 11, 19, 27, 35 (7B, -5l)      |
"""

# Shared by both sizes: the tokenizer's vocabulary and special tokens, and the M2RNN and GDN head shapes.
_COMMON = dict(
    vocab_size=100352,
    bos_token_id=100257,
    eos_token_id=100257,
    pad_token_id=100256,
    tie_word_embeddings=False,
    max_position_embeddings=4096,
    head_dim=64,
    m2rnn_k_head_dim=64,
    m2rnn_v_head_dim=16,
    m2rnn_num_q_heads=1,
    m2rnn_num_k_heads=1,
    m2rnn_conv_kernel_size=4,
    gdn_key_head_dim=256,
    gdn_value_head_dim=512,
    gdn_conv_kernel_size=4,
)

_SIZES = {
    "400m": dict(
        hidden_size=1024,
        num_hidden_layers=24,
        intermediate_size=2752,
        num_attention_heads=16,
        num_key_value_heads=16,
        m2rnn_heads=84,
        gdn_num_heads=2,
        mlp="dense",
    ),
    "7b": dict(
        hidden_size=1536,
        num_hidden_layers=40,
        intermediate_size=1024,   # unused: every MLP of the 7B models is a mixture of experts
        num_attention_heads=24,
        num_key_value_heads=24,
        m2rnn_heads=132,
        gdn_num_heads=3,
        mlp="sparse",
        num_experts=128,
        num_experts_per_tok=8,
        moe_intermediate_size=256,
        shared_expert_intermediate_size=1024,
        norm_topk_prob=True,
        router_aux_loss_coef=0.001,
    ),
}


def _mixers(num_layers: int, default: str, m2rnn_layers=()) -> list[str]:
    """Attention at every 8th layer from 4, M2RNN at `m2rnn_layers`, `default` elsewhere."""
    return [
        "attention" if i % 8 == 4 else "m2rnn" if i in m2rnn_layers else default for i in range(num_layers)
    ]


def _preset(size: str, mixer_types: list[str]) -> dict:
    fields = dict(_SIZES[size])
    heads, mlp = fields.pop("m2rnn_heads"), fields.pop("mlp")
    head_counts = {f"m2rnn_num_{name}_heads": heads for name in ("v", "f", "g", "weight")}
    return {**_COMMON, **fields, **head_counts, "mixer_types": mixer_types, "mlp_layer_types": [mlp] * len(mixer_types)}


def _family(size: str, num_layers: int) -> dict:
    """The five models of one size, by name."""
    return {
        f"m2rnn-{size}": _preset(size, ["m2rnn"] * num_layers),
        f"hybrid-m2rnn-{size}": _preset(size, _mixers(num_layers, "m2rnn")),
        f"hybrid-gated-deltanet-{size}": _preset(size, _mixers(num_layers, "gated_deltanet")),
        f"hybrid-gated-deltanet-m2rnn-1l-{size}": _preset(size, _mixers(num_layers, "gated_deltanet", (0,))),
        f"hybrid-gated-deltanet-m2rnn-{num_layers // 8}l-{size}": _preset(
            size, _mixers(num_layers, "gated_deltanet", range(3, num_layers, 8))
        ),
    }


PRESETS = {**_family("400m", 24), **_family("7b", 40)}
