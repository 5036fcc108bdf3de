"""Our checkpoint → lm-engine's unsharded layout (`config.json` of a `gpt_base` model and safetensors under
lm-engine's names), the inverse of `lm_engine.convert_lm_engine_checkpoint`: to continue training in lm-engine.

lm-engine's fused tensors (c_attn from q, k, v; SwiGLU c_fc from gate and up) need several of our tensors, which
our sharded checkpoints may spread over two shards: the parts wait in memory until the last one arrives, so at
most one shard and one layer's parts are held at a time.
"""

import json
from pathlib import Path

import torch

from ..configuration import M2RNNConfig
from .lm_engine import OUTPUT_INDEX, check_destination, writing_into
from .lm_engine_config import INVERSE_SQRT_HEAD_DIM, LM_ENGINE_MODEL_TYPE, M2RNN_G_NORM_EPS
from .lm_engine_sources import SafetensorsSource
from .lm_engine_tensors import CONV_NAMES, GATED_DELTANET_NAMES, M2RNN_NAMES


def _refuse(field: str, value, why: str):
    raise ValueError(f"`{field}` = {value!r} cannot be written for lm-engine: {why}")


def _mixer_types(config) -> list[str]:
    default = ["m2rnn" if t == "linear_attention" else "attention" for t in config.layer_types]
    return list(getattr(config, "mixer_types", None) or default)


def _mlp_types(config) -> list[str]:
    return list(getattr(config, "mlp_layer_types", None) or ["dense"] * config.num_hidden_layers)


def _m2rnn_block(config) -> dict:
    num_heads = config.m2rnn_num_heads
    for name in ("m2rnn_num_f_heads", "m2rnn_num_g_heads"):
        if getattr(config, name) != num_heads:
            _refuse(name, getattr(config, name), f"lm-engine's M2RNN needs it equal to N = {num_heads}")
    if config.rms_norm_eps != M2RNN_G_NORM_EPS:
        _refuse("rms_norm_eps", config.rms_norm_eps, f"lm-engine's M2RNN output norm always uses {M2RNN_G_NORM_EPS}")
    a_min, a_max = config.m2rnn_A_init_min, config.m2rnn_A_init_max
    dt_min, dt_max = config.m2rnn_dt_init_min, config.m2rnn_dt_init_max
    kernel = config.m2rnn_conv_kernel_size
    return {
        "sequence_mixer_type": "m2rnn", "k_head_dim": config.m2rnn_k_head_dim, "v_head_dim": config.m2rnn_v_head_dim,
        "num_q_heads": config.m2rnn_num_q_heads, "num_k_heads": config.m2rnn_num_k_heads,
        "num_v_heads": config.m2rnn_num_v_heads, "num_f_heads": config.m2rnn_num_f_heads,
        "num_g_heads": config.m2rnn_num_g_heads, "num_weight_heads": config.m2rnn_num_weight_heads,
        "use_residual": config.m2rnn_use_residual, "kernel_size": kernel,
        "activation_function": None if kernel is None else "silu", "add_bias": False,
        "gradient_clipping": config.m2rnn_gradient_clipping, "normalization_function": "rmsnorm",
        "A_init_min": a_min, "A_init_max": a_max, "dt_init_min": dt_min, "dt_init_max": dt_max,
        "dt_init_floor": config.m2rnn_dt_init_floor,
    }


def _gated_deltanet_block(config) -> dict:
    if getattr(config, "gdn_allow_neg_eigval", False):
        _refuse("gdn_allow_neg_eigval", True, "only false is converted")
    heads = config.gdn_num_heads
    return {
        "sequence_mixer_type": "gated_deltanet", "k_head_dim": config.gdn_key_head_dim,
        "v_head_dim": config.gdn_value_head_dim, "num_k_heads": heads, "num_v_heads": heads,
        "use_gate": config.gdn_use_gate, "allow_neg_eigval": False, "attention_multiplier": None,
        "kernel_size": config.gdn_conv_kernel_size, "A_init_min": 0.0, "A_init_max": 16.0, "dt_init_min": 0.001,
        "dt_init_max": 0.1, "dt_init_floor": 0.0001,
    }


def _attention_block(config) -> dict:
    if config.use_rope:
        _refuse("use_rope", True, "lm-engine's RoPE has not been checked against ours")
    if config.attention_bias:
        _refuse("attention_bias", True, "the converter writes no biases")
    return {
        "sequence_mixer_type": "softmax_attention", "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads, "head_dim": config.head_dim,
        "softmax_dropout": config.attention_dropout, "dropout": 0.0, "add_bias": False, "attention_multiplier": None,
        "attention_multiplier_method": INVERSE_SQRT_HEAD_DIM, "attention_gate": False,
        "exclusive_self_attention": False, "sliding_window": None,
    }


def _mlp_block(config, kind: str) -> dict:
    if config.hidden_act != "silu":
        _refuse("hidden_act", config.hidden_act, "lm-engine's SwiGLU uses silu")
    if kind == "dense":
        return {"mlp_type": "MLP", "intermediate_size": config.intermediate_size, "activation_function": "swiglu",
                "dropout": 0.0, "add_bias": False}
    if not config.norm_topk_prob:
        _refuse("norm_topk_prob", False, "the converter writes lm-engine's normalized top-k routing only")
    return {
        "mlp_type": "MoE", "intermediate_size": config.moe_intermediate_size, "activation_function": "swiglu",
        "dropout": 0.0, "add_bias": False, "num_experts": config.num_experts,
        "num_experts_per_tok": config.num_experts_per_tok,
        "shared_intermediate_size": config.shared_expert_intermediate_size or None, "shared_expert_gating": False,
        "normalized_topk": True,
    }


_MIXER_BLOCKS = {"m2rnn": _m2rnn_block, "gated_deltanet": _gated_deltanet_block, "attention": _attention_block}


def lm_engine_config_of(config) -> dict:
    """Our M2RNNConfig → lm-engine's config.json (a dict) for the same model. Raises ValueError for a setting the
    converter does not write."""
    return {
        "model_type": LM_ENGINE_MODEL_TYPE, "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_position_embeddings, "hidden_size": config.hidden_size,
        "num_layers": config.num_hidden_layers, "embedding_dropout": 0.0, "normalization_function": "rmsnorm",
        "layer_norm_epsilon": config.rms_norm_eps, "initializer_range": config.initializer_range,
        "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id,
        "position_embedding_type": "nope", "rope_theta": 10000, "rope_scaling": None, "rope_dim": None,
        "m_emb": None, "m_width": None, "m_residual": None,
        "init_method": "normal", "embedding_init_method": "normal", "use_depth_scaled_init": True,
        "sequence_mixer_blocks": [_MIXER_BLOCKS[kind](config) for kind in _mixer_types(config)],
        "mlp_blocks": [_mlp_block(config, kind) for kind in _mlp_types(config)],
        "tie_word_embeddings": config.tie_word_embeddings,
        "router_aux_loss_coef": getattr(config, "router_aux_loss_coef", 0.001),
        "architectures": ["GPTBaseForCausalLM"],
    }


def interleave_gate_up(gate: torch.Tensor, up: torch.Tensor, dim: int) -> torch.Tensor:
    """(gate, up) → lm-engine's SwiGLU weight, gate and up rows alternating along `dim`, gate first."""
    return torch.stack([gate, up], dim=dim + 1).flatten(dim, dim + 1)


def group_qkv_per_kv_head(q, k, v, num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """q, k, v weights → lm-engine's c_attn: per KV head g, the query heads of its group, then k_g, then v_g."""
    hidden = q.shape[-1]
    group = num_heads // num_kv_heads
    parts = (q.view(num_kv_heads, group * head_dim, hidden), k.view(num_kv_heads, head_dim, hidden),
             v.view(num_kv_heads, head_dim, hidden))
    return torch.cat(parts, dim=1).reshape(-1, hidden)


def _recipes(config) -> dict:
    """lm-engine tensor name → (our tensor names, function of those tensors giving it)."""
    recipes = {"transformer.wte.weight": (["model.embed_tokens.weight"], lambda t: t),
               "transformer.ln_f.weight": (["model.norm.weight"], lambda t: t)}
    if not config.tie_word_embeddings:
        recipes["lm_head.weight"] = (["lm_head.weight"], lambda t: t)
    attention_shape = (config.num_attention_heads, config.num_key_value_heads, config.head_dim)
    for i, (mixer, mlp) in enumerate(zip(_mixer_types(config), _mlp_types(config))):
        ours, theirs = f"model.layers.{i}.", f"transformer.h.{i}."
        renames = {"ln_1.weight": "input_layernorm.weight", "ln_2.weight": "post_attention_layernorm.weight"}
        if mixer == "m2rnn":
            renames.update({f"sequence_mixer.{name}": f"m2rnn.{our_name}" for name, our_name in M2RNN_NAMES.items()
                            if name != "D" or config.m2rnn_use_residual})
        elif mixer == "gated_deltanet":
            renames.update({f"sequence_mixer.{name}": f"gated_deltanet.{our_name}"
                            for name, our_name in GATED_DELTANET_NAMES.items()})
        if mixer in CONV_NAMES and (mixer != "m2rnn" or config.m2rnn_conv_kernel_size is not None):
            recipes[theirs + "sequence_mixer." + CONV_NAMES[mixer]] = ([ours + f"{mixer}.conv_weight"],
                                                                       lambda t: t.unsqueeze(1))   # (C, k) → (C, 1, k)
        if mixer == "attention":
            recipes[theirs + "sequence_mixer.c_attn.weight"] = (
                [ours + f"self_attn.{p}_proj.weight" for p in "qkv"],
                lambda q, k, v: group_qkv_per_kv_head(q, k, v, *attention_shape),
            )
            renames["sequence_mixer.c_proj.weight"] = "self_attn.o_proj.weight"
        if mlp == "dense":
            recipes[theirs + "mlp_block.c_fc.weight"] = ([ours + "mlp.gate_proj.weight", ours + "mlp.up_proj.weight"],
                                                         lambda gate, up: interleave_gate_up(gate, up, dim=0))
            renames["mlp_block.c_proj.weight"] = "mlp.down_proj.weight"
        else:
            renames.update({"mlp_block.gate.weight": "mlp.router.weight",
                            "mlp_block.c_proj.weight": "mlp.experts.down_proj"})
            recipes[theirs + "mlp_block.c_fc.weight"] = (
                [ours + "mlp.experts.gate_up_proj"],
                lambda gate_up: interleave_gate_up(*gate_up.chunk(2, dim=1), dim=1),
            )
            if config.shared_expert_intermediate_size:
                recipes[theirs + "mlp_block.c_fc_shared.weight"] = (
                    [ours + "mlp.shared_expert.gate_proj.weight", ours + "mlp.shared_expert.up_proj.weight"],
                    lambda gate, up: interleave_gate_up(gate, up, dim=0),
                )
                renames["mlp_block.c_proj_shared.weight"] = "mlp.shared_expert.down_proj.weight"
        for name, our_name in renames.items():
            recipes[theirs + name] = ([ours + our_name], lambda t: t)
    return recipes


def export_lm_engine_checkpoint(src, dst, *, progress: bool = True) -> Path:
    """Write our checkpoint `src` (a folder save_pretrained wrote) as an lm-engine unsharded checkpoint in the new
    folder `dst` (config.json and safetensors, sharded as `src` is; tokenizer files copied). Raises ValueError for
    a setting lm-engine's layout cannot hold, and for tensors of `src` the conversion would leave behind."""

    src, dst = Path(src), Path(dst)
    check_destination(dst, src)
    _check_ours(src)
    config = M2RNNConfig.from_pretrained(src)
    lm_config = lm_engine_config_of(config)
    recipes = _recipes(config)
    source = SafetensorsSource(src)
    needed = {name for names, _ in recipes.values() for name in names}
    available = set(source.tensor_specs())
    if missing := sorted(needed - available):
        raise ValueError(f"{src} lacks tensors the lm-engine checkpoint needs: {missing[:8]}")
    if left_behind := sorted(available - needed - {"lm_head.weight"}):
        raise ValueError(f"{src} holds tensors the lm-engine layout has no place for: {left_behind[:8]}")
    waiting_for = {name: target for target, (names, _) in recipes.items() for name in names}

    with writing_into(dst, src) as written:
        shards = _write_shards(source, recipes, waiting_for, dst, progress, written)
        _name_shards(shards, dst, written)
        written.append(dst / "config.json")
        (dst / "config.json").write_text(json.dumps(lm_config, indent=2) + "\n", encoding="utf-8")
    return dst


def _check_ours(src: Path):
    """`src` must hold a config.json of ours: one of lm-engine's, or none, would load as a default M2RNNConfig."""
    config_file = src / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{src} holds no config.json: expected a folder that save_pretrained wrote")
    model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    if model_type == LM_ENGINE_MODEL_TYPE:
        raise ValueError(f"{src} is an lm-engine checkpoint (model_type {model_type!r}): `--from lm-engine` converts "
                         "it to ours")
    if model_type != M2RNNConfig.model_type:
        raise ValueError(f"{src} is not a checkpoint of ours: its config.json has model_type {model_type!r}, "
                         f"expected {M2RNNConfig.model_type!r}")


def _write_shards(source, recipes, waiting_for, dst: Path, progress: bool, written: list) -> list[tuple[Path, dict]]:
    """One output shard per source shard that completes any lm-engine tensor: [(file, {name: nbytes})]."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    shards, pending = [], {}
    with tqdm(total=len(waiting_for), desc="converting tensors", unit="tensor", disable=not progress) as bar:
        for k, group in enumerate(source.load_groups()):
            shard = {}
            for name in list(group):
                tensor = group.pop(name)
                if name not in waiting_for:
                    continue   # the tied lm_head save_pretrained writes: lm-engine reads the embeddings instead
                pending[name] = tensor
                bar.update()
                names, combine = recipes[waiting_for[name]]
                if all(part in pending for part in names):
                    shard[waiting_for[name]] = combine(*(pending.pop(part) for part in names)).contiguous()
            if shard:
                path = dst / f"part-{k}.safetensors"
                written.append(path)
                save_file(shard, path, metadata={"format": "pt"})
                shards.append((path, {name: t.numel() * t.element_size() for name, t in shard.items()}))
    return shards


def _name_shards(shards: list[tuple[Path, dict]], dst: Path, written: list):
    """The written parts under lm-engine's (and transformers') shard names, with an index when there are several."""
    weight_map = {}
    for k, (path, sizes) in enumerate(shards, start=1):
        file = "model.safetensors" if len(shards) == 1 else f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        written.append(dst / file)
        path.rename(dst / file)
        weight_map.update(dict.fromkeys(sizes, file))
    if len(shards) > 1:
        total_size = sum(size for _, sizes in shards for size in sizes.values())
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        written.append(dst / OUTPUT_INDEX)
        (dst / OUTPUT_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
