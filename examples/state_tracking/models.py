"""The four sequence labellers compared on the word problem; each maps token ids (B, S) to logits (B, S, order).

- m2rnn:  pure M2RNN (every layer recurrent), through `modeling_m2rnn`.
- hybrid: M2RNN with one softmax-attention layer in the middle (NoPE, as in the paper's hybrids).
- llama:  attention only, transformers' `LlamaForCausalLM` with RoPE.
- gru:    `torch.nn.GRU` between an embedding and a linear head.

The transformers models are used as token-to-logits maps: the loss is computed by the training loop at the
same position as the input (sequence labelling), never through their `labels=` argument, which shifts.
"""

from dataclasses import dataclass

from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from modeling_m2rnn import M2RNNConfig, M2RNNForCausalLM

MODELS = ("m2rnn", "hybrid", "llama", "gru")


@dataclass
class ModelSize:
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 8             # attention heads, and M2RNN heads (N)
    m2rnn_head_dim: int = 16       # K = V
    max_length: int = 1024         # the longest evaluation length (RoPE's table size)


class Labeller(nn.Module):
    """A transformers causal LM whose logits label every position."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, ids):
        return self.lm(input_ids=ids, use_cache=False).logits


class GRULabeller(nn.Module):
    def __init__(self, vocab_size: int, size: ModelSize):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, size.hidden_size)
        self.gru = nn.GRU(size.hidden_size, size.hidden_size, num_layers=size.num_layers, batch_first=True)
        self.head = nn.Linear(size.hidden_size, vocab_size)

    def forward(self, ids):
        return self.head(self.gru(self.embed(ids))[0])


def m2rnn_config(
    vocab_size: int, size: ModelSize, layer_types: list[str], overrides: dict | None = None
) -> M2RNNConfig:
    """The M2RNN recipe of this study; `overrides` replaces any of its fields (M2RNNConfig keyword arguments)."""
    heads = size.num_heads
    recipe = dict(
        vocab_size=vocab_size,
        hidden_size=size.hidden_size,
        intermediate_size=2 * size.hidden_size,
        num_hidden_layers=len(layer_types),
        layer_types=layer_types,
        num_attention_heads=heads,
        m2rnn_k_head_dim=size.m2rnn_head_dim,
        m2rnn_v_head_dim=size.m2rnn_head_dim,
        # one query and key per head: with a single shared key (the paper's 400M language models) S3 learns
        # far more slowly at this size (CPU, train length 16, 1,500 steps: 0.54 vs 0.78 accuracy)
        m2rnn_num_q_heads=heads,
        m2rnn_num_k_heads=heads,
        m2rnn_num_v_heads=heads,
        m2rnn_num_f_heads=heads,
        m2rnn_num_g_heads=heads,
        m2rnn_num_weight_heads=heads,
        max_position_embeddings=size.max_length,
        m2rnn_dt_init_min=0.5,
        m2rnn_dt_init_max=2.0,   # fast heads at init (f mostly near 0): the state is rewritten every step
        # The recurrence alone, as in the paper's equations: no short convolution, no D ⊙ v skip, no clamp on the
        # state gradient. On the H200 (S3, train length 128, lr 1e-2, 330 s) the full layer fitted 0.44 of the
        # positions at length 128, this one 0.90 (and 1.000 at every length up to 1024 with lr 2e-2): the conv and
        # the skip give the model shortcuts that do not extrapolate, the clamp slows the learning of long products.
        m2rnn_conv_kernel_size=None,
        m2rnn_use_residual=False,
        m2rnn_gradient_clipping=None,
    )
    unknown = set(overrides or {}) - set(M2RNNConfig().to_dict())
    if unknown:
        raise ValueError(f"not M2RNNConfig fields: {sorted(unknown)}")   # the config would keep them and ignore them
    return M2RNNConfig(**{**recipe, **(overrides or {})})


def build_model(name: str, vocab_size: int, size: ModelSize, m2rnn_overrides: dict | None = None) -> nn.Module:
    """`m2rnn_overrides`: M2RNNConfig fields that replace the recipe's, for the m2rnn and hybrid models."""
    if name == "m2rnn":
        return Labeller(M2RNNForCausalLM(m2rnn_config(vocab_size, size, ["m2rnn"] * size.num_layers, m2rnn_overrides)))
    if name == "hybrid":
        # attention in the middle: m2rnn, full_attention, m2rnn for 3 layers; at least one M2RNN layer before it
        layer_types = ["m2rnn"] * size.num_layers
        layer_types[max(1, size.num_layers // 2)] = "full_attention"
        return Labeller(M2RNNForCausalLM(m2rnn_config(vocab_size, size, layer_types, m2rnn_overrides)))
    if name == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=size.hidden_size,
            intermediate_size=2 * size.hidden_size,
            num_hidden_layers=size.num_layers,
            num_attention_heads=size.num_heads,
            max_position_embeddings=size.max_length,
        )
        return Labeller(LlamaForCausalLM(config))
    if name == "gru":
        return GRULabeller(vocab_size, size)
    raise ValueError(f"unknown model {name!r}; expected one of {MODELS}")
