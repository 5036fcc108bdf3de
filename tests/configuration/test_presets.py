"""The paper's models as presets: each builds on the meta device, has the paper's layer pattern, and the README's
table of layer patterns and parameter counts is what the code builds."""

import re
import time
from pathlib import Path

import pytest
import torch

from modeling_m2rnn import M2RNNConfig, M2RNNForCausalLM
from modeling_m2rnn.configuration import PRESETS

README = Path(__file__).resolve().parents[2] / "README.md"
LETTERS = {"m2rnn": "M", "gated_deltanet": "G", "attention": "A"}


def readme_table() -> dict[str, tuple[str, int, int | None]]:
    """preset -> (layer pattern, parameters, active parameters or None for all), as the README states them."""
    rows = re.findall(r"^\| `([a-z0-9-]+)` \| `([MGA]+)` \| ([0-9,]+) \| ([0-9,]+|all) \|$", README.read_text(), re.M)
    return {name: (pattern, int(total.replace(",", "")), None if active == "all" else int(active.replace(",", "")))
            for name, pattern, total, active in rows}


def parameter_counts(model: M2RNNForCausalLM) -> tuple[int, int]:
    """All parameters, and those one token uses: the routed experts a token does not reach are left out."""
    total = sum(p.numel() for p in model.parameters())
    unused = 0
    config = model.config
    for layer in model.model.layers:
        experts = getattr(layer.mlp, "experts", None)
        if experts is not None:
            per_expert = (experts.gate_up_proj.numel() + experts.down_proj.numel()) // config.num_experts
            unused += per_expert * (config.num_experts - config.num_experts_per_tok)
    return total, total - unused


def test_the_ten_presets_of_the_paper_are_there():
    sizes = ("400m", "7b")
    families = ("m2rnn", "hybrid-m2rnn", "hybrid-gated-deltanet", "hybrid-gated-deltanet-m2rnn-1l")
    expected = {f"{family}-{size}" for family in families for size in sizes}
    expected |= {"hybrid-gated-deltanet-m2rnn-3l-400m", "hybrid-gated-deltanet-m2rnn-5l-7b"}
    assert set(PRESETS) == expected


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_each_preset_builds_on_the_meta_device_as_the_readme_describes_it(name):
    began = time.perf_counter()
    config = M2RNNConfig.from_preset(name)
    with torch.device("meta"):
        model = M2RNNForCausalLM(config)
    assert time.perf_counter() - began < 30   # seconds, not the minutes a materialised 7B model would take

    pattern = "".join(LETTERS[mixer] for mixer in config.mixer_types)
    total, active = parameter_counts(model)
    assert readme_table()[name] == (pattern, total, None if active == total else active)
    size = name.rsplit("-", 1)[1]
    attention_layers = [i for i, letter in enumerate(pattern) if letter == "A"]
    hybrid = name.startswith("hybrid-")
    assert attention_layers == (list(range(4, config.num_hidden_layers, 8)) if hybrid else [])
    assert config.layer_types == ["full_attention" if i in attention_layers else "linear_attention"
                                  for i in range(config.num_hidden_layers)]
    assert set(config.mlp_layer_types) == ({"sparse"} if size == "7b" else {"dense"})


def test_presets_place_the_m2rnn_layers_of_the_gated_deltanet_hybrids_as_the_paper_does():
    def m2rnn_layers(name):
        return [i for i, mixer in enumerate(M2RNNConfig.from_preset(name).mixer_types) if mixer == "m2rnn"]

    assert m2rnn_layers("hybrid-gated-deltanet-m2rnn-1l-400m") == [0]
    assert m2rnn_layers("hybrid-gated-deltanet-m2rnn-3l-400m") == [3, 11, 19]
    assert m2rnn_layers("hybrid-gated-deltanet-m2rnn-1l-7b") == [0]
    assert m2rnn_layers("hybrid-gated-deltanet-m2rnn-5l-7b") == [3, 11, 19, 27, 35]
    assert m2rnn_layers("hybrid-gated-deltanet-400m") == m2rnn_layers("hybrid-gated-deltanet-7b") == []


def test_a_preset_takes_overrides_and_fewer_layers_keep_its_first_layers():
    config = M2RNNConfig.from_preset("hybrid-m2rnn-7b", num_hidden_layers=8, hidden_size=768)
    assert (config.num_hidden_layers, config.hidden_size) == (8, 768)
    assert config.mixer_types == ["m2rnn"] * 4 + ["attention"] + ["m2rnn"] * 3
    assert config.mlp_layer_types == ["sparse"] * 8


def test_an_unknown_preset_is_refused_with_the_known_names():
    with pytest.raises(ValueError, match="unknown preset"):
        M2RNNConfig.from_preset("m2rnn-1b")
