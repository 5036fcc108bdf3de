import json

import pytest
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import AutoConfig

import modeling_m2rnn
from modeling_m2rnn import M2RNNConfig


def test_presets_are_the_papers_400m_models():
    pure = M2RNNConfig.from_preset("m2rnn-400m")
    hybrid = M2RNNConfig.from_preset("hybrid-m2rnn-400m")
    for config in (pure, hybrid):
        assert (config.hidden_size, config.intermediate_size, config.vocab_size) == (1024, 2752, 100352)
        assert (config.m2rnn_k_head_dim, config.m2rnn_v_head_dim, config.m2rnn_num_heads) == (64, 16, 84)
        assert config.m2rnn_conv_kernel_size == 4 and config.num_hidden_layers == 24
    assert set(pure.layer_types) == {"linear_attention"}
    assert [i for i, t in enumerate(hybrid.layer_types) if t == "full_attention"] == [4, 12, 20]
    assert M2RNNConfig.from_preset("m2rnn-400m", vocab_size=1000, pad_token_id=None).vocab_size == 1000
    with pytest.raises(ValueError, match="unknown preset"):
        M2RNNConfig.from_preset("m2rnn-7b-typo")


def test_auto_config_and_layer_type_aliases(tmp_path):
    config = AutoConfig.for_model("m2rnn", num_hidden_layers=3, layer_types=["m2rnn", "full_attention", "m2rnn"])
    assert isinstance(config, modeling_m2rnn.M2RNNConfig)
    assert config.layer_types == ["linear_attention", "full_attention", "linear_attention"]
    config.save_pretrained(tmp_path)
    reloaded = AutoConfig.from_pretrained(tmp_path).to_dict()
    assert {k: v for k, v in reloaded.items() if k != "_name_or_path"} == {
        k: v for k, v in config.to_dict().items() if k != "_name_or_path"
    }


@pytest.mark.parametrize(
    "fields, field_named",
    [
        (dict(m2rnn_num_q_heads=5), "m2rnn_num_q_heads"),
        (dict(m2rnn_num_weight_heads=0), "m2rnn_num_weight_heads"),
        (dict(num_hidden_layers=2, layer_types=["m2rnn", "sliding_attention"]), "layer_types"),
        (dict(num_hidden_layers=2, layer_types=["m2rnn"]), "layer_types"),
        (dict(m2rnn_k_head_dim=0), "m2rnn_k_head_dim"),
        (dict(m2rnn_v_head_dim=-4), "m2rnn_v_head_dim"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(m2rnn_conv_kernel_size=1), "m2rnn_conv_kernel_size"),
        (dict(m2rnn_gradient_clipping=0.0), "m2rnn_gradient_clipping"),
        (dict(m2rnn_kernel_backend="cuda"), "m2rnn_kernel_backend"),
        (dict(num_hidden_layers=1, layer_types=["full_attention"], num_key_value_heads=3), "num_key_value_heads"),
    ],
)
def test_a_config_that_cannot_work_names_the_field(fields, field_named):
    """transformers 5 configs validate through huggingface_hub's strict dataclasses: the ValueError raised by
    the validator arrives wrapped, as `__cause__`."""
    with pytest.raises(StrictDataclassClassValidationError, match=f"`{field_named}`") as error:
        M2RNNConfig(**fields)
    assert isinstance(error.value.__cause__, ValueError)


def test_no_convolution_is_allowed():
    assert M2RNNConfig(m2rnn_conv_kernel_size=None).m2rnn_conv_kernel_size is None


def test_a_config_json_with_the_old_backend_field_name_loads_it_as_the_kernel_backend(tmp_path):
    """`m2rnn_scan_backend` was the field's name before it chose the short conv's and the gated norm's kernels too."""
    M2RNNConfig(num_hidden_layers=2).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["m2rnn_kernel_backend"]
    saved["m2rnn_scan_backend"] = "torch"
    (tmp_path / "config.json").write_text(json.dumps(saved))
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.m2rnn_kernel_backend == "torch" and "m2rnn_scan_backend" not in config.to_dict()
