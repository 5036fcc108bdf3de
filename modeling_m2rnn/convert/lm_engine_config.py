"""lm-engine's model config (`gpt_base`: `sequence_mixer_blocks`, `mlp_blocks`) → the fields of M2RNNConfig.

Anything our model cannot represent exactly is refused with a ValueError naming the option and its value: a
converted checkpoint either computes what lm-engine computes, or it is not written. Options that only matter in
training (dropouts, initialisation) are mapped where we have a field and otherwise dropped with a warning.

Each block kind has a list of the options we know. An option we do not know is accepted when it is off (None,
False, 0: a newer lm-engine's feature left disabled) and refused otherwise, since nobody has checked what it does.
"""

import math
import warnings

from ..configuration import M2RNNConfig

LM_ENGINE_MODEL_TYPE = "gpt_base"
# lm-engine builds the M2RNN output norm (g_norm) with its normalisation function's default eps, whatever
# `layer_norm_epsilon` says; our M2RNN layer uses `rms_norm_eps` for it.
M2RNN_G_NORM_EPS = 1e-5
INVERSE_SQRT_HEAD_DIM = "1 / sqrt(head_dim)"

# Options that do not change the computation at inference, per block kind (initialisation, bookkeeping).
_INIT_OPTIONS = {"A_init_min", "A_init_max", "dt_init_min", "dt_init_max", "dt_init_floor"}
_KNOWN_OPTIONS = {
    "m2rnn": _INIT_OPTIONS | {
        "sequence_mixer_type", "k_head_dim", "v_head_dim", "num_q_heads", "num_k_heads", "num_v_heads",
        "num_f_heads", "num_g_heads", "num_weight_heads", "use_residual", "kernel_size", "activation_function",
        "add_bias", "gradient_clipping", "normalization_function",
    },
    "gated_deltanet": _INIT_OPTIONS | {
        "sequence_mixer_type", "k_head_dim", "v_head_dim", "num_k_heads", "num_v_heads", "use_gate",
        "attention_multiplier", "allow_neg_eigval", "kernel_size",
    },
    "softmax_attention": {
        "sequence_mixer_type", "num_attention_heads", "num_key_value_heads", "head_dim", "softmax_dropout", "dropout",
        "add_bias", "attention_multiplier", "attention_multiplier_method", "attention_gate",
        "exclusive_self_attention", "sliding_window", "use_qk_norm",
    },
    "MLP": {"mlp_type", "intermediate_size", "activation_function", "dropout", "add_bias"},
    "MoE": {
        "mlp_type", "intermediate_size", "activation_function", "dropout", "add_bias", "shared_intermediate_size",
        "num_experts", "num_experts_per_tok", "shared_expert_gating", "normalized_topk",
    },
}
# Top-level options that change nothing at inference once the checks below have passed.
_KNOWN_TOP_LEVEL = {
    "model_type", "vocab_size", "max_position_embeddings", "hidden_size", "num_layers", "embedding_dropout",
    "normalization_function", "layer_norm_epsilon", "initializer_range", "bos_token_id", "eos_token_id",
    "pad_token_id", "position_embedding_type", "rope_theta", "rope_scaling", "rope_dim", "m_emb", "m_width",
    "m_residual", "init_method", "embedding_init_method", "use_depth_scaled_init", "sequence_mixer_blocks",
    "mlp_blocks", "tie_word_embeddings", "router_aux_loss_coef", "architectures", "transformers_version", "dtype",
    "torch_dtype", "use_cache", "auto_map", "_name_or_path", "return_dict", "output_hidden_states",
    "output_attentions", "is_encoder_decoder", "tokenizer_class",
}


def _refuse(option: str, value, why: str):
    raise ValueError(f"lm-engine option `{option}` = {value!r} is not supported: {why}")


def _is_off(value) -> bool:
    return value is None or value is False or value == 0


def _check_unknown_options(block: dict, kind: str, where: str):
    for option in sorted(set(block) - _KNOWN_OPTIONS[kind]):
        if not _is_off(block[option]):
            _refuse(f"{where}.{option}", block[option], "an option this converter does not know (only its off "
                    "value None / False / 0 is accepted)")


def _shared(blocks: list[tuple[int, dict]], option: str, kind: str):
    """The value of `option` that every block of one kind has: our config holds one value for all such layers."""
    values = {repr(block.get(option)): block.get(option) for _, block in blocks}
    if len(values) > 1:
        per_layer = {f"layer {i}": block.get(option) for i, block in blocks}
        raise ValueError(
            f"lm-engine option `{option}` differs between {kind} layers ({per_layer}); M2RNNConfig holds one value "
            "for all layers of a kind"
        )
    return next(iter(values.values()))


def _warn_dropped(option: str, value):
    warnings.warn(
        f"lm-engine option `{option}` = {value!r} only acts in training and has no field in M2RNNConfig: dropped",
        stacklevel=3,
    )


def _check_top_level(config: dict):
    if config.get("model_type") == M2RNNConfig.model_type:
        raise ValueError(f"this is a checkpoint of ours (model_type {M2RNNConfig.model_type!r}), not lm-engine's: it "
                         "loads with from_pretrained as it is, and `--to lm-engine` converts it the other way")
    if config.get("model_type") != LM_ENGINE_MODEL_TYPE:
        _refuse("model_type", config.get("model_type"), f"only lm-engine's {LM_ENGINE_MODEL_TYPE!r} models convert")
    for option in ("m_emb", "m_width", "m_residual"):
        if config.get(option) is not None:
            _refuse(option, config[option], "muP multipliers have no place in our model; only null converts")
    position = config.get("position_embedding_type", "nope")
    if position != "nope":
        _refuse("position_embedding_type", position, "only 'nope' (no position embedding, the paper's choice) "
                "converts; lm-engine's RoPE has not been checked against ours")
    if config.get("normalization_function") != "rmsnorm":
        _refuse("normalization_function", config.get("normalization_function"), "only 'rmsnorm' converts")
    if not _is_off(config.get("embedding_dropout")):
        _warn_dropped("embedding_dropout", config["embedding_dropout"])
    for option in sorted(set(config) - _KNOWN_TOP_LEVEL):
        if not _is_off(config[option]):
            _refuse(option, config[option], "an option this converter does not know (only its off value None / "
                    "False / 0 is accepted)")
    num_layers = config.get("num_layers")
    for option in ("sequence_mixer_blocks", "mlp_blocks"):
        if not isinstance(config.get(option), list) or len(config[option]) != num_layers:
            raise ValueError(f"lm-engine option `{option}` must list one block per layer (num_layers={num_layers})")


def _m2rnn_fields(blocks: list[tuple[int, dict]], config: dict) -> dict:
    for i, block in blocks:
        where = f"sequence_mixer_blocks[{i}]"
        _check_unknown_options(block, "m2rnn", where)
        if block.get("add_bias"):
            _refuse(f"{where}.add_bias", block["add_bias"], "our M2RNN projections and conv have no biases")
        if block.get("normalization_function") != "rmsnorm":
            _refuse(f"{where}.normalization_function", block.get("normalization_function"),
                    "the M2RNN output norm converts only as 'rmsnorm'")
        activation = block.get("activation_function")
        if block.get("kernel_size") is not None and activation not in ("silu", "swish"):
            _refuse(f"{where}.activation_function", activation, "the short convolution converts only with 'silu'")
        heads = [block[f"num_{name}_heads"] for name in ("q", "k", "v", "f", "weight")]
        num_heads = max(heads)
        for name in ("f", "g"):
            # lm-engine sizes its decay gate by N and repeats g element-wise, not head-wise: only N heads agree
            if block[f"num_{name}_heads"] != num_heads:
                _refuse(f"{where}.num_{name}_heads", block[f"num_{name}_heads"],
                        f"converts only equal to the number of heads N = {num_heads}")
    eps = config.get("layer_norm_epsilon")
    if eps != M2RNN_G_NORM_EPS:
        _refuse("layer_norm_epsilon", eps, f"lm-engine's M2RNN output norm always uses eps {M2RNN_G_NORM_EPS} and "
                "ours uses rms_norm_eps for it, so with M2RNN layers only that value converts")

    def shared(option):
        return _shared(blocks, option, "m2rnn")

    return {
        "m2rnn_k_head_dim": shared("k_head_dim"),
        "m2rnn_v_head_dim": shared("v_head_dim"),
        "m2rnn_num_q_heads": shared("num_q_heads"),
        "m2rnn_num_k_heads": shared("num_k_heads"),
        "m2rnn_num_v_heads": shared("num_v_heads"),
        "m2rnn_num_f_heads": shared("num_f_heads"),
        "m2rnn_num_g_heads": shared("num_g_heads"),
        "m2rnn_num_weight_heads": shared("num_weight_heads"),
        "m2rnn_conv_kernel_size": shared("kernel_size"),
        "m2rnn_use_residual": shared("use_residual"),
        # lm-engine clips at |c| whatever the sign; our config takes the positive bound
        "m2rnn_gradient_clipping": None if (clip := shared("gradient_clipping")) is None else abs(clip),
        "m2rnn_A_init_min": shared("A_init_min"),
        "m2rnn_A_init_max": shared("A_init_max"),
        "m2rnn_dt_init_min": shared("dt_init_min"),
        "m2rnn_dt_init_max": shared("dt_init_max"),
        "m2rnn_dt_init_floor": shared("dt_init_floor"),
    }


def _gated_deltanet_fields(blocks: list[tuple[int, dict]]) -> dict:
    for i, block in blocks:
        where = f"sequence_mixer_blocks[{i}]"
        _check_unknown_options(block, "gated_deltanet", where)
        if block["num_k_heads"] != block["num_v_heads"]:
            _refuse(f"{where}.num_k_heads", block["num_k_heads"],
                    f"converts only equal to num_v_heads = {block['num_v_heads']}")
        if block.get("allow_neg_eigval"):
            _refuse(f"{where}.allow_neg_eigval", block["allow_neg_eigval"], "only false converts")
        multiplier = block.get("attention_multiplier")
        if multiplier is not None and not math.isclose(multiplier, block["k_head_dim"] ** -0.5, rel_tol=1e-6):
            _refuse(f"{where}.attention_multiplier", multiplier, "only null or 1/sqrt(k_head_dim) converts")

    def shared(option):
        return _shared(blocks, option, "gated_deltanet")

    return {
        "gdn_num_heads": shared("num_v_heads"),
        "gdn_key_head_dim": shared("k_head_dim"),
        "gdn_value_head_dim": shared("v_head_dim"),
        "gdn_conv_kernel_size": shared("kernel_size"),
        "gdn_use_gate": shared("use_gate"),
        "gdn_allow_neg_eigval": False,
    }


def _attention_fields(blocks: list[tuple[int, dict]], hidden_size: int) -> dict:
    for i, block in blocks:
        where = f"sequence_mixer_blocks[{i}]"
        _check_unknown_options(block, "softmax_attention", where)
        for option, why in (
            ("add_bias", "our attention projections have no biases"),
            ("sliding_window", "our attention is global"),
            ("attention_gate", "our attention has no output gate"),
            ("exclusive_self_attention", "our attention does not project out v"),
            ("use_qk_norm", "our attention has no q/k norm"),
        ):
            if not _is_off(block.get(option)):
                _refuse(f"{where}.{option}", block[option], why)
        head_dim = block.get("head_dim") or hidden_size // block["num_attention_heads"]
        method, multiplier = block.get("attention_multiplier_method"), block.get("attention_multiplier")
        if method is None and multiplier is not None:
            if not math.isclose(multiplier, head_dim**-0.5, rel_tol=1e-6):
                _refuse(f"{where}.attention_multiplier", multiplier, f"only 1/sqrt(head_dim) = {head_dim**-0.5} "
                        "converts")
        elif method not in (INVERSE_SQRT_HEAD_DIM, None):
            _refuse(f"{where}.attention_multiplier_method", method, f"only {INVERSE_SQRT_HEAD_DIM!r} converts")
        if not _is_off(block.get("dropout")):
            _warn_dropped(f"{where}.dropout", block["dropout"])

    def shared(option):
        return _shared(blocks, option, "softmax_attention")

    return {
        "num_attention_heads": shared("num_attention_heads"),
        "num_key_value_heads": shared("num_key_value_heads"),
        "head_dim": shared("head_dim") or hidden_size // shared("num_attention_heads"),
        "attention_dropout": shared("softmax_dropout") or 0.0,
    }


def _check_mlp(block: dict, i: int):
    where = f"mlp_blocks[{i}]"
    _check_unknown_options(block, block["mlp_type"], where)
    if block.get("activation_function") != "swiglu":
        _refuse(f"{where}.activation_function", block.get("activation_function"), "only 'swiglu' converts")
    if block.get("add_bias"):
        _refuse(f"{where}.add_bias", block["add_bias"], "our MLPs have no biases")
    if not _is_off(block.get("dropout")):
        _warn_dropped(f"{where}.dropout", block["dropout"])


def _dense_mlp_fields(blocks: list[tuple[int, dict]]) -> dict:
    for i, block in blocks:
        _check_mlp(block, i)
    return {"intermediate_size": _shared(blocks, "intermediate_size", "dense MLP"), "hidden_act": "silu"}


def _moe_fields(blocks: list[tuple[int, dict]], config: dict) -> dict:
    for i, block in blocks:
        _check_mlp(block, i)
        if not block.get("normalized_topk", True):
            _refuse(f"mlp_blocks[{i}].normalized_topk", block["normalized_topk"],
                    "our router always renormalises the top-k weights")
        if block.get("shared_expert_gating"):
            _refuse(f"mlp_blocks[{i}].shared_expert_gating", block["shared_expert_gating"],
                    "our shared expert is ungated")

    def shared(option):
        return _shared(blocks, option, "MoE")

    return {
        "num_experts": shared("num_experts"),
        "num_experts_per_tok": shared("num_experts_per_tok"),
        "moe_intermediate_size": shared("intermediate_size"),
        "shared_expert_intermediate_size": shared("shared_intermediate_size") or 0,
        "norm_topk_prob": True,
        "router_aux_loss_coef": config.get("router_aux_loss_coef", 0.001),
    }


# lm-engine's sequence mixer → (our cache kind in `layer_types`, our mixer in `mixer_types`)
MIXERS = {
    "m2rnn": ("linear_attention", "m2rnn"),
    "gated_deltanet": ("linear_attention", "gated_deltanet"),
    "softmax_attention": ("full_attention", "attention"),
}
# lm-engine's MLP → ours in `mlp_layer_types`
MLPS = {"MLP": "dense", "MoE": "sparse"}


def translate_config(config: dict) -> dict:
    """lm-engine's config.json (a dict) → keyword arguments of M2RNNConfig. Raises ValueError for what does not
    convert. `mixer_types` and `mlp_layer_types` are written only when a layer needs them (GDN, MoE), so that pure
    M2RNN / attention models give the config older versions of this package read."""
    _check_top_level(config)
    mixers, mlps = config["sequence_mixer_blocks"], config["mlp_blocks"]
    for i, block in enumerate(mixers):
        if block.get("sequence_mixer_type") not in MIXERS:
            _refuse(f"sequence_mixer_blocks[{i}].sequence_mixer_type", block.get("sequence_mixer_type"),
                    f"only {sorted(MIXERS)} convert")
    for i, block in enumerate(mlps):
        if block.get("mlp_type") not in MLPS:
            _refuse(f"mlp_blocks[{i}].mlp_type", block.get("mlp_type"), f"only {sorted(MLPS)} convert")

    def of_kind(blocks, key, kind):
        return [(i, block) for i, block in enumerate(blocks) if block[key] == kind]

    fields = {
        "vocab_size": config["vocab_size"],
        "hidden_size": config["hidden_size"],
        "num_hidden_layers": config["num_layers"],
        "max_position_embeddings": config.get("max_position_embeddings", 4096),
        "rms_norm_eps": config["layer_norm_epsilon"],
        "initializer_range": config.get("initializer_range", 0.02),
        "tie_word_embeddings": bool(config.get("tie_word_embeddings", False)),
        "bos_token_id": config.get("bos_token_id"),
        "eos_token_id": config.get("eos_token_id"),
        "pad_token_id": config.get("pad_token_id"),
        "layer_types": [MIXERS[block["sequence_mixer_type"]][0] for block in mixers],
    }
    if blocks := of_kind(mixers, "sequence_mixer_type", "m2rnn"):
        fields.update(_m2rnn_fields(blocks, config))
    if blocks := of_kind(mixers, "sequence_mixer_type", "gated_deltanet"):
        fields.update(_gated_deltanet_fields(blocks))
        fields["mixer_types"] = [MIXERS[block["sequence_mixer_type"]][1] for block in mixers]
    if blocks := of_kind(mixers, "sequence_mixer_type", "softmax_attention"):
        fields.update(_attention_fields(blocks, config["hidden_size"]))
    if blocks := of_kind(mlps, "mlp_type", "MLP"):
        fields.update(_dense_mlp_fields(blocks))
    if blocks := of_kind(mlps, "mlp_type", "MoE"):
        fields.update(_moe_fields(blocks, config))
        fields["mlp_layer_types"] = [MLPS[block["mlp_type"]] for block in mlps]
    return fields
