"""The Gated DeltaNet layer: lm-engine's semantics written out by hand, packing and padding."""

import pytest
import torch
import torch.nn.functional as F

from modeling_m2rnn import M2RNNConfig
from modeling_m2rnn.kernels.gated_delta_rule import gated_delta_rule
from modeling_m2rnn.layers import GatedDeltaNet, PackedSequences


def tiny_layer(seed=0, dtype=torch.float64, **overrides) -> GatedDeltaNet:
    fields = {"hidden_size": 32, "num_hidden_layers": 1, "layer_types": ["gated_deltanet"], "gdn_num_heads": 2,
              "gdn_key_head_dim": 8, "gdn_value_head_dim": 16, "gdn_conv_kernel_size": 4, **overrides}
    torch.manual_seed(seed)
    layer = GatedDeltaNet(M2RNNConfig(**fields), layer_idx=0)
    for name, parameter in layer.named_parameters():   # random, far from any initialisation's symmetries
        with torch.no_grad():
            parameter.copy_(torch.randn_like(parameter) * (0.3 if "proj" in name else 1.0))
    return layer.to(dtype)


def lm_engine_gdn(layer: GatedDeltaNet, x: torch.Tensor) -> torch.Tensor:
    """lm-engine's GatedDeltaNet forward written out: qkv_proj → depthwise causal conv (zero history) → SiLU →
    q | k | v; ab_proj → a | b | gate; q, k heads repeated to the value heads; beta = sigmoid(b) (× 2 with negative
    eigenvalues); g = −exp(A_log)·softplus(a + dt_bias); the gated delta rule on l2-normalised q, k; o ⊙ silu(gate)
    (without the gate, o), then RMSNorm over each head's V values; o_proj."""
    batch, seq_len, _ = x.shape
    heads, k_heads, K, V = layer.num_heads, layer.num_k_heads, layer.key_head_dim, layer.value_head_dim
    qkv = x @ layer.qkv_proj.weight.T
    channels, kernel_size = layer.conv_weight.shape
    conv = F.conv1d(F.pad(qkv.transpose(1, 2), (kernel_size - 1, 0)), layer.conv_weight[:, None], groups=channels)
    q, k, v = F.silu(conv.transpose(1, 2)).split([k_heads * K, k_heads * K, heads * V], dim=-1)
    gate_size = [heads * V] if layer.use_gate else []
    a, b, *gate = (x @ layer.ab_proj.weight.T).split([heads, heads, *gate_size], dim=-1)
    q, k = (t.view(batch, seq_len, k_heads, K).repeat_interleave(heads // k_heads, dim=2) for t in (q, k))
    beta = b.sigmoid() * (2 if layer.allow_neg_eigval else 1)
    g = -layer.A_log.exp() * F.softplus(a + layer.dt_bias)
    o, _ = gated_delta_rule(q, k, v.view(batch, seq_len, heads, V), g, beta, qk_l2norm=True, backend="torch")
    if gate:
        o = o * F.silu(gate[0].view(batch, seq_len, heads, V))
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + layer.norm.eps) * layer.norm.weight
    return o.flatten(2) @ layer.o_proj.weight.T


@pytest.mark.parametrize(
    "overrides",
    [{}, {"gdn_num_k_heads": 1}, {"gdn_allow_neg_eigval": True}, {"gdn_use_gate": False}],
    ids=["heads", "shared_qk", "neg_eigval", "no_gate"],
)
def test_the_layer_is_lm_engines_gated_deltanet(overrides):
    layer = tiny_layer(**overrides)
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    expected = lm_engine_gdn(layer, x)
    # the package's RMSNorm normalises in float32, as Llama's: 1e-6 and not float64's 1e-12 (an eps of 1e-6 instead
    # of 1e-5 would move the output by ~5e-6)
    assert (layer(x) - expected).abs().max() <= 1e-6 * expected.abs().max()


def test_packed_rows_equal_the_rows_alone():
    layer = tiny_layer(seed=1)
    rows = [torch.randn(1, n, 32, dtype=torch.float64) for n in (3, 6, 2)]
    sequence_ids = torch.cat([torch.full((n,), i) for i, n in enumerate((3, 6, 2))])[None]
    packed = layer(torch.cat(rows, dim=1), packed=PackedSequences.from_sequence_ids(sequence_ids))
    alone = torch.cat([layer(row) for row in rows], dim=1)
    assert (packed - alone).abs().max() <= 1e-12 * alone.abs().max()


def test_left_padding_changes_nothing_for_the_real_tokens():
    layer = tiny_layer(seed=2)
    short, long = torch.randn(1, 4, 32, dtype=torch.float64), torch.randn(1, 7, 32, dtype=torch.float64)
    batch = torch.cat([torch.cat([torch.randn(1, 3, 32, dtype=torch.float64), short], dim=1), long])
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :3] = 0
    out = layer(batch, padding_mask=mask)
    assert (out[0, 3:] - layer(short)[0]).abs().max() <= 1e-12 * out.abs().max()
    assert (out[1] - layer(long)[0]).abs().max() <= 1e-12 * out.abs().max()


def test_the_layer_describes_itself():
    text = repr(tiny_layer(gdn_num_k_heads=1))
    assert "heads=2, k_heads=1, key_head_dim=8, value_head_dim=16, conv_kernel_size=4" in text
