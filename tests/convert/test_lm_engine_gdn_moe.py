"""Gated DeltaNet and MoE checkpoints in lm-engine's layout convert and compute what lm-engine computes.

No fixture written by lm-engine holds these blocks, so the test writes a tiny checkpoint in lm-engine's documented
layout (names and shapes of lm_engine/modeling_utils/sequence_mixer_blocks/gated_deltanet, mlp_blocks/moe,
softmax_attention, m2rnn) and computes lm-engine's forward from it in float64 (`reference_forward`, written from
lm-engine's modules: interleaved SwiGLU rows, per-KV-head c_attn, top-k then softmax over the k, fla's gated delta
rule with L2-normalised q and k). These tests need the GDN and MoE layers of the model (issue 26).
"""

import json

import pytest
import torch
import torch.nn.functional as F
from lm_engine_fixtures import FIXTURES, fixture_config, fixture_inputs
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import modeling_m2rnn  # noqa: F401  (registers the Auto classes)
from modeling_m2rnn.convert import convert_lm_engine_checkpoint
from modeling_m2rnn.convert.lm_engine_config import translate_config
from modeling_m2rnn.convert.to_lm_engine import export_lm_engine_checkpoint

# Layout mistakes move the logits by 1e-2 or more; 1e-4 leaves room for the L2-norm eps convention of q and k
# (fla adds 1e-6 under the square root) and float32 against the float64 reference.
LOGITS_BOUND = 1e-4
HIDDEN, VOCAB, SEQ_LEN = 32, 50, 13
MIXERS = ["gated_deltanet", "m2rnn", "softmax_attention", "gated_deltanet"]
MLPS = ["MoE", "MLP", "MoE", "MoE"]
GDN = {"k_head_dim": 8, "v_head_dim": 12, "num_k_heads": 2, "num_v_heads": 2, "kernel_size": 4}
M2RNN = {"k_head_dim": 6, "v_head_dim": 5, "num_q_heads": 1, "num_k_heads": 1, "num_v_heads": 3, "num_f_heads": 3,
         "num_g_heads": 3, "num_weight_heads": 3, "kernel_size": 4}
ATTENTION = {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8}
MOE = {"num_experts": 5, "num_experts_per_tok": 2, "intermediate_size": 16}
DENSE_INTERMEDIATE = 40
INIT = {"A_init_min": 0.0, "A_init_max": 16.0, "dt_init_min": 0.001, "dt_init_max": 0.1, "dt_init_floor": 0.0001}


def lm_engine_config(use_gate: bool = True, shared_intermediate_size: int | None = 24) -> dict:
    mixers = {
        "gated_deltanet": {"sequence_mixer_type": "gated_deltanet", **GDN, "use_gate": use_gate,
                           "allow_neg_eigval": False, "attention_multiplier": None, **INIT},
        "m2rnn": {"sequence_mixer_type": "m2rnn", **M2RNN, "use_residual": True, "activation_function": "silu",
                  "add_bias": False, "gradient_clipping": 1.0, "normalization_function": "rmsnorm", **INIT},
        "softmax_attention": {"sequence_mixer_type": "softmax_attention", **ATTENTION, "softmax_dropout": 0.0,
                              "dropout": 0.0, "add_bias": False, "attention_multiplier": None,
                              "attention_multiplier_method": "1 / sqrt(head_dim)", "attention_gate": False,
                              "exclusive_self_attention": False, "sliding_window": None},
    }
    mlps = {
        "MLP": {"mlp_type": "MLP", "intermediate_size": DENSE_INTERMEDIATE, "activation_function": "swiglu",
                "dropout": 0.0, "add_bias": False},
        "MoE": {"mlp_type": "MoE", **MOE, "shared_intermediate_size": shared_intermediate_size,
                "activation_function": "swiglu", "dropout": 0.0, "add_bias": False, "shared_expert_gating": False,
                "normalized_topk": True},
    }
    return {
        "model_type": "gpt_base", "vocab_size": VOCAB, "max_position_embeddings": 64, "hidden_size": HIDDEN,
        "num_layers": len(MIXERS), "embedding_dropout": 0.0, "normalization_function": "rmsnorm",
        "layer_norm_epsilon": 1e-5, "initializer_range": 0.02, "bos_token_id": 1, "eos_token_id": 2,
        "pad_token_id": 0, "position_embedding_type": "nope", "rope_theta": 10000, "rope_scaling": None,
        "m_emb": None, "m_width": None, "m_residual": None, "init_method": "normal",
        "embedding_init_method": "normal", "use_depth_scaled_init": True,
        "sequence_mixer_blocks": [dict(mixers[kind]) for kind in MIXERS],
        "mlp_blocks": [dict(mlps[kind]) for kind in MLPS],
        "tie_word_embeddings": False, "router_aux_loss_coef": 0.001, "rope_dim": None,
    }


def lm_engine_tensors(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random float32 weights under lm-engine's names and shapes, scaled so that no block is negligible."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=0.15, center=0.0):
        return center + scale * torch.randn(*shape, generator=generator)

    def decay(n):
        return {"decay_gate.A_log": torch.empty(n).uniform_(0.0, 2.5, generator=generator),
                "decay_gate.dt_bias": randn(n, scale=0.5, center=-2.0)}

    tensors = {"transformer.wte.weight": randn(VOCAB, HIDDEN, scale=1.0), "lm_head.weight": randn(VOCAB, HIDDEN),
               "transformer.ln_f.weight": randn(HIDDEN, scale=0.2, center=1.0)}
    for i, (mixer, mlp) in enumerate(zip(config["sequence_mixer_blocks"], config["mlp_blocks"])):
        layer = {f"ln_{n}.weight": randn(HIDDEN, scale=0.2, center=1.0) for n in (1, 2)}
        kind = mixer["sequence_mixer_type"]
        if kind == "gated_deltanet":
            key_dim, value_dim = GDN["num_k_heads"] * GDN["k_head_dim"], GDN["num_v_heads"] * GDN["v_head_dim"]
            ab_rows = 2 * GDN["num_v_heads"] + (value_dim if mixer["use_gate"] else 0)
            mixer_tensors = {"qkv_proj.weight": randn(2 * key_dim + value_dim, HIDDEN),
                             "qkv_conv1d.weight": randn(2 * key_dim + value_dim, 1, GDN["kernel_size"], scale=0.4),
                             "ab_proj.weight": randn(ab_rows, HIDDEN, scale=0.3), **decay(GDN["num_v_heads"]),
                             "o_norm.weight": randn(GDN["v_head_dim"], scale=0.2, center=1.0),
                             "o_proj.weight": randn(HIDDEN, value_dim)}
        elif kind == "m2rnn":
            n, k, v = M2RNN["num_v_heads"], M2RNN["k_head_dim"], M2RNN["v_head_dim"]
            conv_dim = 2 * k + n * v
            mixer_tensors = {"input_projection.weight": randn(conv_dim + n + n * v, HIDDEN),
                             "conv1d.weight": randn(conv_dim, 1, M2RNN["kernel_size"], scale=0.4), **decay(n),
                             "state_weight": randn(n, v, v, scale=0.3) + torch.eye(v),
                             "D": randn(n, v, scale=0.3, center=1.0),
                             "g_norm.weight": randn(n * v, scale=0.2, center=1.0),
                             "output_projection.weight": randn(HIDDEN, n * v)}
        else:
            heads, kv_heads, head_dim = (ATTENTION[key] for key in ("num_attention_heads", "num_key_value_heads",
                                                                    "head_dim"))
            mixer_tensors = {"c_attn.weight": randn((heads + 2 * kv_heads) * head_dim, HIDDEN),
                             "c_proj.weight": randn(HIDDEN, heads * head_dim)}
        layer.update({f"sequence_mixer.{name}": t for name, t in mixer_tensors.items()})
        if mlp["mlp_type"] == "MLP":
            mlp_tensors = {"c_fc.weight": randn(2 * DENSE_INTERMEDIATE, HIDDEN),
                           "c_proj.weight": randn(HIDDEN, DENSE_INTERMEDIATE)}
        else:
            experts, size = MOE["num_experts"], MOE["intermediate_size"]
            mlp_tensors = {"gate.weight": randn(experts, HIDDEN, scale=0.5),
                           "c_fc.weight": randn(experts, 2 * size, HIDDEN),
                           "c_proj.weight": randn(experts, HIDDEN, size)}
            if (shared := mlp["shared_intermediate_size"]) is not None:
                mlp_tensors.update({"c_fc_shared.weight": randn(2 * shared, HIDDEN),
                                    "c_proj_shared.weight": randn(HIDDEN, shared)})
        layer.update({f"mlp_block.{name}": t for name, t in mlp_tensors.items()})
        tensors.update({f"transformer.h.{i}.{name}": t for name, t in layer.items()})
    return tensors


def rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def swiglu(x, c_fc):
    """lm-engine's GLU: the projection's even outputs are the gate, its odd outputs the up projection."""
    h = x @ c_fc.T
    return h[..., 1::2] * F.silu(h[..., 0::2])


def causal_conv_silu(x, weight):
    """nn.Conv1d depthwise, left-padded: x (B, S, C), weight (C, 1, k)."""
    kernel = weight.shape[-1]
    out = F.conv1d(F.pad(x.transpose(1, 2), (kernel - 1, 0)), weight, groups=x.shape[-1])
    return F.silu(out).transpose(1, 2)


def softplus_decay(a, A_log, dt_bias):
    """log of the decay: -exp(A_log) · softplus(a + dt_bias)."""
    return -A_log.exp() * F.softplus(a + dt_bias)


def gated_deltanet(x, p, block):
    batch, seq_len, _ = x.shape
    heads, k_dim, v_dim = block["num_v_heads"], block["k_head_dim"], block["v_head_dim"]
    qkv = causal_conv_silu(x @ p["qkv_proj.weight"].T, p["qkv_conv1d.weight"])
    q, k, v = qkv.split([heads * k_dim, heads * k_dim, heads * v_dim], dim=-1)
    q, k = (t.view(batch, seq_len, heads, k_dim) for t in (q, k))
    q, k = (t * torch.rsqrt(t.pow(2).sum(-1, keepdim=True) + 1e-6) for t in (q, k))
    v = v.view(batch, seq_len, heads, v_dim)
    ab = x @ p["ab_proj.weight"].T
    a, b = ab[..., :heads], ab[..., heads:2 * heads]
    beta, log_decay = b.sigmoid(), softplus_decay(a, p["decay_gate.A_log"], p["decay_gate.dt_bias"])
    state = x.new_zeros(batch, heads, k_dim, v_dim)
    outputs = []
    for t in range(seq_len):   # fla's gated delta rule, one token at a time
        state = state * log_decay[:, t, :, None, None].exp()
        correction = v[:, t] - torch.einsum("bhkv,bhk->bhv", state, k[:, t])
        state = state + torch.einsum("bhk,bhv->bhkv", k[:, t], beta[:, t, :, None] * correction)
        outputs.append(torch.einsum("bhkv,bhk->bhv", state, q[:, t]) * k_dim**-0.5)
    o = torch.stack(outputs, dim=1)                                                    # (B, S, H, V)
    if block["use_gate"]:
        o = o * F.silu(ab[..., 2 * heads:].view(batch, seq_len, heads, v_dim))
    o = rms_norm(o, p["o_norm.weight"], 1e-5)
    return o.flatten(2) @ p["o_proj.weight"].T


def m2rnn(x, p, block):
    batch, seq_len, _ = x.shape
    n, k_dim, v_dim = block["num_v_heads"], block["k_head_dim"], block["v_head_dim"]
    conv_dim = 2 * k_dim + n * v_dim
    c, f, g = (x @ p["input_projection.weight"].T).split([conv_dim, n, n * v_dim], dim=-1)
    q, k, v = causal_conv_silu(c, p["conv1d.weight"]).split([k_dim, k_dim, n * v_dim], dim=-1)
    v = v.view(batch, seq_len, n, v_dim)
    forget = softplus_decay(f, p["decay_gate.A_log"], p["decay_gate.dt_bias"]).exp()
    state = x.new_zeros(batch, n, k_dim, v_dim)
    outputs = []
    for t in range(seq_len):   # one q and k shared by all heads
        outer = k[:, t, None, :, None] * v[:, t, :, None, :]
        candidate = torch.tanh(state @ p["state_weight"] + outer)
        state = forget[:, t, :, None, None] * state + (1 - forget[:, t, :, None, None]) * candidate
        outputs.append(torch.einsum("bk,bnkv->bnv", q[:, t], state))
    y = torch.stack(outputs, dim=1) + v * p["D"]
    y = rms_norm(y.flatten(2) * F.silu(g), p["g_norm.weight"], 1e-5)
    return y @ p["output_projection.weight"].T


def attention(x, p, block):
    batch, seq_len, _ = x.shape
    heads, kv_heads = block["num_attention_heads"], block["num_key_value_heads"]
    head_dim = block["head_dim"] or x.shape[-1] // heads
    group = heads // kv_heads
    per_kv_head = (x @ p["c_attn.weight"].T).view(batch, seq_len, kv_heads, (group + 2) * head_dim)
    q, k, v = per_kv_head.split([group * head_dim, head_dim, head_dim], dim=-1)
    q = q.reshape(batch, seq_len, heads, head_dim).transpose(1, 2)
    k, v = (t.repeat_interleave(group, dim=2).transpose(1, 2) for t in (k, v))
    scores = q @ k.transpose(-1, -2) * head_dim**-0.5
    scores = scores.masked_fill(torch.ones(seq_len, seq_len, dtype=torch.bool).triu(1), float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)
    return out @ p["c_proj.weight"].T


def moe(x, p, block):
    logits = x @ p["gate.weight"].T                                                   # (B, S, E)
    top_logits, experts = logits.topk(block["num_experts_per_tok"], dim=-1)
    weights = top_logits.softmax(-1)                                                  # softmax over the k chosen
    out = torch.zeros_like(x)
    for e in range(block["num_experts"]):
        chosen = (experts == e)                                                       # (B, S, k)
        expert_out = swiglu(x, p["c_fc.weight"][e]) @ p["c_proj.weight"][e].T
        out = out + (weights * chosen).sum(-1, keepdim=True) * expert_out
    if "c_fc_shared.weight" in p:
        out = out + swiglu(x, p["c_fc_shared.weight"]) @ p["c_proj_shared.weight"].T
    return out


MIXER_FORWARD = {"gated_deltanet": gated_deltanet, "m2rnn": m2rnn, "softmax_attention": attention}


def reference_forward(tensors: dict, config: dict, ids: torch.Tensor, block_outputs: list | None = None):
    """lm-engine's forward in float64 from its own tensor names: pre-norm blocks, ln_f, untied lm_head → logits.
    Appends every block's output (the residual stream after it) to `block_outputs` when given."""
    t = {name: tensor.double() for name, tensor in tensors.items()}
    eps = config["layer_norm_epsilon"]
    x = t["transformer.wte.weight"][ids]
    for i, (mixer, mlp) in enumerate(zip(config["sequence_mixer_blocks"], config["mlp_blocks"])):
        prefix = f"transformer.h.{i}."
        mixer_params, mlp_params = (
            {n.removeprefix(prefix + part): v for n, v in t.items() if n.startswith(prefix + part)}
            for part in ("sequence_mixer.", "mlp_block.")
        )
        mixer_forward = MIXER_FORWARD[mixer["sequence_mixer_type"]]
        x = x + mixer_forward(rms_norm(x, t[prefix + "ln_1.weight"], eps), mixer_params, mixer)
        h = rms_norm(x, t[prefix + "ln_2.weight"], eps)
        if mlp["mlp_type"] == "MLP":
            x = x + swiglu(h, mlp_params["c_fc.weight"]) @ mlp_params["c_proj.weight"].T
        else:
            x = x + moe(h, mlp_params, mlp)
        if block_outputs is not None:
            block_outputs.append(x)
    return rms_norm(x, t["transformer.ln_f.weight"], eps) @ t["lm_head.weight"].T


@pytest.mark.parametrize("name", FIXTURES)
def test_the_reference_forward_reproduces_lm_engines_own_fixtures(name):
    """The reference's M2RNN, attention and dense MLP against logits lm-engine computed itself."""
    fixture = FIXTURES[name]
    reference = reference_forward(load_file(fixture / "model.safetensors"), fixture_config(fixture),
                                  fixture_inputs(fixture))
    logits = load_file(fixture / "logits.safetensors")["logits"].double()
    assert ((reference - logits).norm() / logits.norm()).item() <= 1e-6


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours.double() - reference).norm() / reference.norm()).item()


def write_checkpoint(folder, config: dict, tensors: dict):
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "use_gate, shared_intermediate_size",
    [(True, 24), (False, None)],
    ids=["gdn-gate+shared-expert", "no-gdn-gate+no-shared-expert"],
)
def test_gated_deltanet_and_moe_checkpoints_convert_to_lm_engines_logits(tmp_path, use_gate, shared_intermediate_size):
    config = lm_engine_config(use_gate, shared_intermediate_size)
    tensors = lm_engine_tensors(config)
    write_checkpoint(tmp_path / "lm-engine", config, tensors)
    dst = convert_lm_engine_checkpoint(tmp_path / "lm-engine", tmp_path / "converted", progress=False)

    ours = json.loads((dst / "config.json").read_text())
    assert ours["mixer_types"] == ["gated_deltanet", "m2rnn", "attention", "gated_deltanet"]
    assert ours["mlp_layer_types"] == ["sparse", "dense", "sparse", "sparse"]
    assert ours["shared_expert_intermediate_size"] == (shared_intermediate_size or 0)

    model = AutoModelForCausalLM.from_pretrained(dst).eval()
    ids = torch.randint(0, VOCAB, (2, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    blocks = []
    reference = reference_forward(tensors, config, ids, blocks)
    error = relative_error(out.logits, reference)
    # our hidden states: embeddings, then each layer's output (the last one replaced by the final norm's)
    per_block = {f"block {i} ({kind})": f"{relative_error(out.hidden_states[i + 1], blocks[i]):.2e}"
                 for i, kind in enumerate(MIXERS[:-1])}
    final = rms_norm(blocks[-1], tensors["transformer.ln_f.weight"].double(), config["layer_norm_epsilon"])
    per_block[f"ln_f(block {len(MIXERS) - 1})"] = f"{relative_error(out.hidden_states[-1], final):.2e}"
    assert error <= LOGITS_BOUND, f"logits differ from lm-engine's forward by {error:.3e} relative; {per_block}"


def test_gated_deltanet_and_moe_checkpoints_export_back_to_lm_engine_bit_exactly(tmp_path):
    config = lm_engine_config()
    tensors = lm_engine_tensors(config)
    write_checkpoint(tmp_path / "lm-engine", config, tensors)
    ours = convert_lm_engine_checkpoint(tmp_path / "lm-engine", tmp_path / "ours", progress=False)
    exported = export_lm_engine_checkpoint(ours, tmp_path / "exported", progress=False)
    back = load_file(exported / "model.safetensors")
    assert sorted(back) == sorted(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(back[name], tensor), name
    assert translate_config(json.loads((exported / "config.json").read_text())) == translate_config(config)


def test_moe_experts_are_stored_gate_rows_first_as_transformers_expects(tmp_path):
    config = lm_engine_config()
    tensors = lm_engine_tensors(config)
    write_checkpoint(tmp_path / "lm-engine", config, tensors)
    dst = convert_lm_engine_checkpoint(tmp_path / "lm-engine", tmp_path / "converted", progress=False)
    converted = load_file(dst / "model.safetensors")
    c_fc = tensors["transformer.h.0.mlp_block.c_fc.weight"]                           # (E, 2I, hidden) interleaved
    gate_up = converted["model.layers.0.mlp.experts.gate_up_proj"]                    # (E, 2I, hidden) gate | up
    size = MOE["intermediate_size"]
    assert torch.equal(gate_up[:, :size], c_fc[:, 0::2]) and torch.equal(gate_up[:, size:], c_fc[:, 1::2])
    ours, theirs = "model.layers.0.mlp.", "transformer.h.0.mlp_block."
    assert torch.equal(converted[ours + "experts.down_proj"], tensors[theirs + "c_proj.weight"])   # (E, hidden, I)
    assert torch.equal(converted[ours + "router.weight"], tensors[theirs + "gate.weight"])


REFUSALS = [
    # (layer, option, value, words of the message)
    (0, "num_k_heads", 1, "converts only equal to num_v_heads = 2"),
    (0, "allow_neg_eigval", True, "only false converts"),
    (0, "attention_multiplier", 0.5, "only null or 1/sqrt(k_head_dim) converts"),
    (3, "v_head_dim", 16, "differs between gated_deltanet layers"),
    ("mlp", "normalized_topk", False, "our router always renormalises the top-k weights"),
    ("mlp", "shared_expert_gating", True, "our shared expert is ungated"),
    ("mlp", "activation_function", "geglu", "only 'swiglu' converts"),
]


@pytest.mark.parametrize("layer, option, value, message", REFUSALS, ids=[f"{r[1]}={r[2]}" for r in REFUSALS])
def test_a_gated_deltanet_or_moe_option_we_cannot_represent_is_refused_by_name(tmp_path, layer, option, value,
                                                                                  message):
    config = lm_engine_config()
    if layer == "mlp":
        config["mlp_blocks"][0][option] = value
    else:
        config["sequence_mixer_blocks"][layer][option] = value
    write_checkpoint(tmp_path / "lm-engine", config, lm_engine_tensors(lm_engine_config()))
    with pytest.raises(ValueError, match=f"`[^`]*{option}` ") as error:
        convert_lm_engine_checkpoint(tmp_path / "lm-engine", tmp_path / "converted", progress=False)
    assert message in str(error.value)
    assert not (tmp_path / "converted").exists()
