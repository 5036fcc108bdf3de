from torch import nn
from transformers.activations import ACT2FN

from .linear import Linear


class GatedMLP(nn.Module):
    """SwiGLU (with the default `hidden_act="silu"`): down(act(gate(x)) * up(x)), `intermediate_size` wide unless
    told otherwise (the MoE's shared expert)."""

    def __init__(self, config, intermediate_size: int | None = None):
        super().__init__()
        width = config.intermediate_size if intermediate_size is None else intermediate_size
        self.gate_proj = Linear(config.hidden_size, width, bias=False)
        self.up_proj = Linear(config.hidden_size, width, bias=False)
        self.down_proj = Linear(width, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
