"""lm-engine's tensor names and layouts → ours, one source tensor at a time (no tensor needs another to convert).

Layouts that differ (all read from lm-engine's modules, see docs in the README's "From lm-engine" section):
- SwiGLU `c_fc` (2I, hidden): gate on even rows, up on odd rows (lm-engine's GLU reads x[..., ::2] as the gate),
  in dense MLPs, in the experts (E, 2I, hidden: along dim 1) and in the shared expert.
- attention `c_attn` ((nh + 2·nkv)·hd, hidden): rows grouped per KV head, [q heads of the group, k, v] per group.
- depthwise conv weights are nn.Conv1d's (C, 1, k); ours are (C, k).
Everything else is a renaming: the M2RNN input projection is q | k | v | f | g like ours, GDN's `qkv_proj` is
q | k | v and its `ab_proj` a | b | gate like ours.
"""

import re

import torch

_LAYER = re.compile(r"transformer\.h\.(\d+)\.(.+)")
_TOP_LEVEL = {
    "transformer.wte.weight": "model.embed_tokens.weight",
    "transformer.ln_f.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
M2RNN_NAMES = {
    "input_projection.weight": "in_proj.weight",
    "decay_gate.A_log": "A_log",
    "decay_gate.dt_bias": "dt_bias",
    "state_weight": "W",
    "D": "D",
    "g_norm.weight": "norm.weight",
    "output_projection.weight": "out_proj.weight",
}
GATED_DELTANET_NAMES = {
    "qkv_proj.weight": "qkv_proj.weight",
    "ab_proj.weight": "ab_proj.weight",
    "decay_gate.A_log": "A_log",
    "decay_gate.dt_bias": "dt_bias",
    "o_norm.weight": "norm.weight",
    "o_proj.weight": "o_proj.weight",
}
CONV_NAMES = {"m2rnn": "conv1d.weight", "gated_deltanet": "qkv_conv1d.weight"}
_MIXER_MODULE = {"m2rnn": "m2rnn", "gated_deltanet": "gated_deltanet", "softmax_attention": "self_attn"}


def split_interleaved_gate_up(weight: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """lm-engine's SwiGLU weight, gate and up rows interleaved along `dim` (gate first) → (gate, up)."""
    index = [slice(None)] * weight.dim()
    index[dim] = slice(0, None, 2)
    gate = weight[tuple(index)]
    index[dim] = slice(1, None, 2)
    return gate.contiguous(), weight[tuple(index)].contiguous()


def split_grouped_qkv(weight: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int):
    """c_attn ((nh + 2·nkv)·hd, hidden), rows [q heads of group g, k_g, v_g] per KV head g → q, k, v weights."""
    group = num_heads // num_kv_heads
    per_kv_head = weight.view(num_kv_heads, (group + 2) * head_dim, weight.shape[-1])
    q, k, v = per_kv_head.split([group * head_dim, head_dim, head_dim], dim=1)
    return (x.reshape(-1, weight.shape[-1]).contiguous() for x in (q, k, v))


class TensorMapping:
    """Converts lm-engine tensors of one model to ours, knowing which mixer and MLP each layer has."""

    def __init__(self, lm_engine_config: dict):
        self.mixer_types = [block["sequence_mixer_type"] for block in lm_engine_config["sequence_mixer_blocks"]]
        self.mlp_types = [block["mlp_type"] for block in lm_engine_config["mlp_blocks"]]
        self.attention = {}
        for i, block in enumerate(lm_engine_config["sequence_mixer_blocks"]):
            if block["sequence_mixer_type"] == "softmax_attention":
                num_heads = block["num_attention_heads"]
                head_dim = block.get("head_dim") or lm_engine_config["hidden_size"] // num_heads
                self.attention[i] = (num_heads, block["num_key_value_heads"], head_dim)

    def convert(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """One lm-engine tensor → our tensors by name (views where no copy is needed). Raises ValueError for a
        name that has no place in our model (a bias, a position embedding, a module we do not have)."""
        if name in _TOP_LEVEL:
            return {_TOP_LEVEL[name]: tensor}
        match = _LAYER.fullmatch(name)
        if match is None or int(match.group(1)) >= len(self.mixer_types):
            raise ValueError(f"lm-engine tensor {name!r} has no counterpart in our model")
        i, rest = int(match.group(1)), match.group(2)
        prefix = f"model.layers.{i}."
        if rest == "ln_1.weight":
            return {prefix + "input_layernorm.weight": tensor}
        if rest == "ln_2.weight":
            return {prefix + "post_attention_layernorm.weight": tensor}
        if rest.startswith("sequence_mixer."):
            mixer = self.mixer_types[i]
            converted = self._convert_mixer(i, mixer, rest.removeprefix("sequence_mixer."), tensor)
            module = prefix + _MIXER_MODULE[mixer] + "."
        elif rest.startswith("mlp_block."):
            converted = self._convert_mlp(self.mlp_types[i], rest.removeprefix("mlp_block."), tensor)
            module = prefix + "mlp."
        else:
            converted = None
        if converted is None:
            raise ValueError(f"lm-engine tensor {name!r} has no counterpart in our model")
        return {module + ours: value for ours, value in converted.items()}

    def _convert_mixer(self, i: int, mixer: str, name: str, tensor: torch.Tensor) -> dict | None:
        if mixer in CONV_NAMES and name == CONV_NAMES[mixer]:
            return {"conv_weight": tensor.squeeze(1)}                                     # (C, 1, k) → (C, k)
        if mixer == "m2rnn" and name in M2RNN_NAMES:
            return {M2RNN_NAMES[name]: tensor}
        if mixer == "gated_deltanet" and name in GATED_DELTANET_NAMES:
            return {GATED_DELTANET_NAMES[name]: tensor}
        if mixer == "softmax_attention" and name == "c_attn.weight":
            q, k, v = split_grouped_qkv(tensor, *self.attention[i])
            return {"q_proj.weight": q, "k_proj.weight": k, "v_proj.weight": v}
        if mixer == "softmax_attention" and name == "c_proj.weight":
            return {"o_proj.weight": tensor}
        return None

    @staticmethod
    def _convert_mlp(mlp: str, name: str, tensor: torch.Tensor) -> dict | None:
        if mlp == "MLP" and name == "c_fc.weight":
            gate, up = split_interleaved_gate_up(tensor, dim=0)
            return {"gate_proj.weight": gate, "up_proj.weight": up}
        if mlp == "MLP" and name == "c_proj.weight":
            return {"down_proj.weight": tensor}
        if mlp == "MoE" and name == "gate.weight":
            return {"router.weight": tensor}                                              # (E, hidden)
        if mlp == "MoE" and name == "c_fc.weight":
            gate, up = split_interleaved_gate_up(tensor, dim=1)                           # (E, 2I, hidden)
            return {"experts.gate_up_proj": torch.cat([gate, up], dim=1)}                 # gate rows, then up rows
        if mlp == "MoE" and name == "c_proj.weight":
            return {"experts.down_proj": tensor}                                          # (E, hidden, I)
        if mlp == "MoE" and name == "c_fc_shared.weight":
            gate, up = split_interleaved_gate_up(tensor, dim=0)
            return {"shared_expert.gate_proj.weight": gate, "shared_expert.up_proj.weight": up}
        if mlp == "MoE" and name == "c_proj_shared.weight":
            return {"shared_expert.down_proj.weight": tensor}
        return None
