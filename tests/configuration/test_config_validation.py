"""M2RNNConfig refuses values that cannot work, with a ValueError naming the field, and loads the configs of
older checkpoints."""

import copy
import json
import math

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError

from modeling_m2rnn import M2RNNConfig, M2RNNForCausalLM

TINY = {
    "vocab_size": 37, "hidden_size": 24, "intermediate_size": 40, "num_hidden_layers": 2,
    "layer_types": ["m2rnn", "full_attention"], "num_attention_heads": 2, "head_dim": 12, "m2rnn_k_head_dim": 5,
    "m2rnn_v_head_dim": 3, "m2rnn_num_v_heads": 2, "m2rnn_num_f_heads": 2, "m2rnn_num_g_heads": 2,
    "m2rnn_num_weight_heads": 2,
}


def zero_init(config: M2RNNConfig) -> M2RNNConfig:
    """What transformers' test mixins do to a config before checking the initialisation: every `*_range`, `*_std`,
    `initializer_factor` and `layer_scale` key is set to a tiny number, which every field of that name accepts."""
    config = copy.deepcopy(config)
    for key in config.__dict__:
        if any(part in key for part in ("_range", "_std", "initializer_factor", "layer_scale")):
            setattr(config, key, 1e-10)
    return config


def test_the_test_mixins_zero_init_config_validates_and_builds_a_model():
    config = zero_init(M2RNNConfig(**TINY))
    config.validate()
    model = M2RNNForCausalLM(config)
    # initializer_range ~ 0: the linear weights are ~0, the recurrence's own init still follows its fields
    assert model.lm_head.weight.abs().max() < 1e-8
    assert torch.equal(model.model.layers[0].m2rnn.W, torch.eye(3).expand(2, 3, 3))


def test_the_forget_gate_init_fields_are_scalars_like_mamba2s():
    config = M2RNNConfig(
        **TINY, m2rnn_A_init_min=1, m2rnn_A_init_max=8.0, m2rnn_dt_init_min=0.01, m2rnn_dt_init_max=0.2
    )
    saved = config.to_dict()
    assert (saved["m2rnn_A_init_min"], saved["m2rnn_A_init_max"]) == (1, 8.0)
    assert (saved["m2rnn_dt_init_min"], saved["m2rnn_dt_init_max"], saved["m2rnn_dt_init_floor"]) == (0.01, 0.2, 1e-4)
    assert not any(key.endswith("_init_range") for key in saved)

    torch.manual_seed(0)
    mixer = M2RNNForCausalLM(config).model.layers[0].m2rnn
    A, dt = mixer.A_log.exp(), torch.nn.functional.softplus(mixer.dt_bias)
    assert ((A >= 1 - 1e-6) & (A <= 8 + 1e-5)).all()
    assert ((dt >= 0.01 * (1 - 1e-5)) & (dt <= 0.2 * (1 + 1e-5))).all()


def test_a_config_saved_with_the_former_init_range_lists_loads_and_is_not_written_back(tmp_path):
    old = {**M2RNNConfig(**TINY).to_dict(), "m2rnn_A_init_range": [1.0, 8.0], "m2rnn_dt_init_range": [0.01, 0.2]}
    for key in ("m2rnn_A_init_min", "m2rnn_A_init_max", "m2rnn_dt_init_min", "m2rnn_dt_init_max"):
        del old[key]
    (tmp_path / "config.json").write_text(json.dumps(old))
    config = M2RNNConfig.from_pretrained(tmp_path)
    assert (config.m2rnn_A_init_min, config.m2rnn_A_init_max) == (1.0, 8.0)
    assert (config.m2rnn_dt_init_min, config.m2rnn_dt_init_max) == (0.01, 0.2)
    config.save_pretrained(tmp_path / "again")
    written = json.loads((tmp_path / "again" / "config.json").read_text())
    assert "m2rnn_A_init_range" not in written and "m2rnn_dt_init_range" not in written
    assert written["m2rnn_A_init_max"] == 8.0


@pytest.mark.parametrize("legacy_field", ["m2rnn_A_init_range", "m2rnn_dt_init_range"])
def test_a_former_init_range_of_three_numbers_names_the_field(legacy_field):
    with pytest.raises(ValueError, match=f"`{legacy_field}` must be \\[low, high\\]"):
        M2RNNConfig(**TINY, **{legacy_field: [0.01, 0.1, 1.0]})


@pytest.mark.parametrize(
    "fields, field_named",
    [
        ({"rms_norm_eps": -1.0}, "rms_norm_eps"),
        ({"rms_norm_eps": 0.0}, "rms_norm_eps"),
        ({"rms_norm_eps": math.nan}, "rms_norm_eps"),
        ({"m2rnn_gradient_clipping": math.nan}, "m2rnn_gradient_clipping"),
        ({"m2rnn_gradient_clipping": math.inf}, "m2rnn_gradient_clipping"),
        ({"m2rnn_gradient_clipping": -1.0}, "m2rnn_gradient_clipping"),
        ({"hidden_act": "bogus"}, "hidden_act"),
        ({"m2rnn_A_init_min": -1.0}, "m2rnn_A_init_min"),
        ({"m2rnn_A_init_min": 4.0, "m2rnn_A_init_max": 2.0}, "m2rnn_A_init_max"),
        ({"m2rnn_A_init_max": math.inf}, "m2rnn_A_init_max"),
        ({"m2rnn_dt_init_min": 0.0}, "m2rnn_dt_init_min"),
        ({"m2rnn_dt_init_min": 0.5, "m2rnn_dt_init_max": 0.1}, "m2rnn_dt_init_max"),
        ({"m2rnn_dt_init_max": math.nan}, "m2rnn_dt_init_max"),
        ({"m2rnn_dt_init_floor": -1e-4}, "m2rnn_dt_init_floor"),
        ({"initializer_range": -0.02}, "initializer_range"),
    ],
)
def test_a_value_that_would_give_nan_logits_or_fail_later_names_the_field(fields, field_named):
    """transformers 5 configs validate through huggingface_hub's strict dataclasses: the ValueError raised by the
    config's validate_* method arrives wrapped, as `__cause__`."""
    with pytest.raises(StrictDataclassClassValidationError, match=f"`{field_named}`") as error:
        M2RNNConfig(**{**TINY, **fields})
    assert isinstance(error.value.__cause__, ValueError)


def test_no_gradient_clipping_and_a_zero_floor_are_allowed():
    config = M2RNNConfig(**TINY, m2rnn_gradient_clipping=None, m2rnn_dt_init_floor=0.0, hidden_act="gelu")
    assert config.m2rnn_gradient_clipping is None and config.m2rnn_dt_init_floor == 0.0


@pytest.mark.parametrize("legacy_name", ["mamba", "conv", "attention", "sliding_attention", "moe"])
def test_a_layer_type_this_model_does_not_implement_is_refused_not_remapped(legacy_name):
    """transformers remaps the legacy "mamba" and "conv" to linear_attention, which here would silently build an
    M2RNN layer where the user asked for another kind."""
    with pytest.raises(StrictDataclassClassValidationError, match=f"`layer_types`.*'{legacy_name}'"):
        M2RNNConfig(**{**TINY, "layer_types": [legacy_name, "m2rnn"]})


def test_the_m2rnn_alias_and_transformers_names_are_accepted():
    config = M2RNNConfig(**{**TINY, "layer_types": ["m2rnn", "linear_attention"]})
    assert config.layer_types == ["linear_attention", "linear_attention"]
    config = M2RNNConfig(**{**TINY, "layer_types": ["full_attention", "m2rnn"]})
    assert config.layer_types == ["full_attention", "linear_attention"]


def test_without_rope_the_config_has_no_rope_parameters(tmp_path):
    config = M2RNNConfig(**TINY)
    assert config.rope_parameters is None and config.rope_scaling is None
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["rope_parameters"] is None
    # a checkpoint saved when NoPE configs still carried the defaults loads without them
    old = {**config.to_dict(), "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}}
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert M2RNNConfig.from_pretrained(tmp_path).rope_parameters is None


def test_with_rope_the_rope_parameters_default_as_transformers_does():
    config = M2RNNConfig(**TINY, use_rope=True)
    assert config.rope_parameters == {"rope_theta": 10000.0, "rope_type": "default"}
    scaled = M2RNNConfig(**TINY, use_rope=True, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                 "rope_theta": 100.0})
    assert scaled.rope_parameters["factor"] == 2.0


@pytest.mark.parametrize("offset", [0, 5])
def test_a_padding_token_outside_the_vocabulary_names_the_field(offset):
    # (nn.Embedding would fail with an AssertionError instead)
    for pad_token_id in (TINY["vocab_size"] + offset, -1 - offset):
        with pytest.raises(StrictDataclassClassValidationError, match="`pad_token_id`"):
            M2RNNConfig(**{**TINY, "pad_token_id": pad_token_id})


def test_a_padding_token_inside_the_vocabulary_builds_a_model():
    config = M2RNNConfig(**{**TINY, "pad_token_id": 0})
    assert M2RNNForCausalLM(config).model.embed_tokens.padding_idx == 0
