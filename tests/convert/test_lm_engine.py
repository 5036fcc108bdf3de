"""The lm-engine importer against checkpoints and logits written by lm-engine's own code (tests/fixtures/lm_engine,
README.txt in each says how): every layout mistake moves these logits by 1e-2 or more, so the bound is tight."""

import json
import subprocess
import sys

import pytest
import torch
import yaml
from lm_engine_fixtures import FIXTURES, fixture_config, fixture_inputs
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import modeling_m2rnn  # noqa: F401  (registers the Auto classes)
from modeling_m2rnn.convert import convert_lm_engine_checkpoint
from modeling_m2rnn.convert.__main__ import main
from modeling_m2rnn.convert.lm_engine_config import translate_config
from modeling_m2rnn.convert.lm_engine_tensors import split_grouped_qkv, split_interleaved_gate_up
from modeling_m2rnn.convert.to_lm_engine import export_lm_engine_checkpoint

LOGITS_BOUND = 1e-5


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours.double() - reference.double()).norm() / reference.double().norm()).item()


def assert_matches_lm_engine(model_dir, fixture):
    """Our logits within LOGITS_BOUND (relative) of lm-engine's; on failure the message names the first stage
    (embedding, block i, final norm) whose output differs, from our hidden states and lm-engine's block outputs."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert model.dtype == torch.float32
    reference = load_file(fixture / "logits.safetensors")
    with torch.no_grad():
        out = model(fixture_inputs(fixture), output_hidden_states=True)
    error = relative_error(out.logits, reference["logits"])
    if error <= LOGITS_BOUND:
        return error
    # transformers' hidden states: the embeddings, every layer's output, the last one replaced by the final norm's
    num_layers = len(out.hidden_states) - 1
    stages = [("embedding_output", out.hidden_states[0])]
    stages += [(f"block_output.{i}", out.hidden_states[i + 1]) for i in range(num_layers - 1)]
    stages += [("last_hidden_state", out.hidden_states[-1])]
    errors = {name: relative_error(ours, reference[name]) for name, ours in stages}
    first = next((name for name, e in errors.items() if e > LOGITS_BOUND), "lm_head (every block agrees)")
    raise AssertionError(f"logits differ from lm-engine's by {error:.3e} relative; first differing output: {first}; "
                         f"per stage: { {name: f'{e:.2e}' for name, e in errors.items()} }")


@pytest.mark.parametrize("name", FIXTURES)
def test_each_fixture_converts_to_lm_engines_logits_within_1e_5(tmp_path, name):
    fixture = FIXTURES[name]
    dst = convert_lm_engine_checkpoint(fixture, tmp_path / "converted", progress=False)
    assert_matches_lm_engine(dst, fixture)


def test_the_command_line_converts_a_checkpoint(tmp_path, capsys):
    main(["--from", "lm-engine", str(FIXTURES["m2rnn-tiny"]), str(tmp_path / "converted"), "--no-progress"])
    assert "converted" in capsys.readouterr().out
    assert_matches_lm_engine(tmp_path / "converted", FIXTURES["m2rnn-tiny"])


REMOTE_CODE_SCRIPT = """
import json, sys, torch
sys.modules["modeling_m2rnn"] = None   # the package must not be importable: only the checkpoint's code may run
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
assert "modeling_m2rnn" not in type(model).__module__.split(".")[0], type(model).__module__
ids = torch.tensor(json.load(open(sys.argv[2]))["input_ids"])
with torch.no_grad():
    torch.save(model(ids).logits, sys.argv[3])
"""


def test_a_converted_folder_loads_with_trust_remote_code_without_the_package(tmp_path):
    fixture = FIXTURES["hybrid-m2rnn-tiny"]
    dst = convert_lm_engine_checkpoint(fixture, tmp_path / "converted", progress=False)
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_CODE_SCRIPT, str(dst), str(fixture / "inputs.json"), str(tmp_path / "l.pt")],
        check=False, capture_output=True, text=True, cwd=tmp_path,
        env={"HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reference = load_file(fixture / "logits.safetensors")["logits"]
    assert relative_error(torch.load(tmp_path / "l.pt"), reference) <= LOGITS_BOUND


def _write_sharded(fixture, folder, num_shards: int):
    """The fixture's tensors as lm-engine's unshard step writes a sharded checkpoint: shards and an index."""
    folder.mkdir()
    tensors = load_file(fixture / "model.safetensors")
    names = sorted(tensors)
    weight_map = {}
    for k in range(num_shards):
        file = f"model-{k + 1:05d}-of-{num_shards:05d}.safetensors"
        part = names[k::num_shards]
        save_file({n: tensors[n] for n in part}, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {"total_size": sum(t.numel() * 4 for t in tensors.values())}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text((fixture / "config.json").read_text())


def test_a_sharded_source_converts_shard_by_shard_to_the_same_logits(tmp_path):
    fixture = FIXTURES["hybrid-m2rnn-tiny"]
    _write_sharded(fixture, tmp_path / "sharded", num_shards=2)
    (tmp_path / "sharded" / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    dst = convert_lm_engine_checkpoint(tmp_path / "sharded", tmp_path / "converted", progress=False)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{k}-of-00002.safetensors" for k in (1, 2)]
    assert (dst / "tokenizer_config.json").read_text() == '{"model_max_length": 64}'
    assert_matches_lm_engine(dst, fixture)


def _write_dcp(fixture, save_path, folder: str, iteration: int = 7):
    """The fixture's tensors as lm-engine's training loop saves them: torch DCP under global_step{N}/model (keys
    state.model.<name>) or, saved asynchronously, global_step{N}/model_optimizer (state.model.model.<name>), with
    the model's config in training_config.yml and the latest iteration beside."""
    import torch.distributed.checkpoint as dcp

    model_state = {f"model.{name}": tensor for name, tensor in load_file(fixture / "model.safetensors").items()}
    state = model_state if folder == "model" else {"model": model_state}
    step = save_path / f"global_step{iteration}"
    with pytest.warns(UserWarning, match="single process"):
        dcp.save({"state": state}, checkpoint_id=str(step / folder), no_dist=True)
    training = {"model_args": {"pretrained_config": json.loads((fixture / "config.json").read_text())},
                "distributed_args": {"tensor_parallel_world_size": 1}}
    (step / "training_config.yml").write_text(yaml.safe_dump(training))
    (save_path / "latest_checkpointed_iteration.json").write_text(json.dumps({"latest_checkpointed_iteration": 7}))


@pytest.mark.parametrize("folder", ["model", "model_optimizer"])
def test_a_distributed_training_checkpoint_converts_to_the_same_logits(tmp_path, folder):
    fixture = FIXTURES["m2rnn-tiny"]
    _write_dcp(fixture, tmp_path / "run", folder)
    dst = convert_lm_engine_checkpoint(tmp_path / "run", tmp_path / "converted", max_shard_size=200_000,
                                       progress=False)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1   # read and written a group of tensors at a time
    assert_matches_lm_engine(dst, fixture)


def test_a_tensor_parallel_training_checkpoint_is_refused(tmp_path):
    _write_dcp(FIXTURES["m2rnn-tiny"], tmp_path / "run", "model")
    config_file = tmp_path / "run" / "global_step7" / "training_config.yml"
    training = yaml.safe_load(config_file.read_text())
    training["distributed_args"]["tensor_parallel_world_size"] = 2
    config_file.write_text(yaml.safe_dump(training))
    with pytest.raises(ValueError, match=r"`distributed_args.tensor_parallel_world_size` = 2 is not supported"):
        convert_lm_engine_checkpoint(tmp_path / "run", tmp_path / "converted", progress=False)


def test_tied_embeddings_convert_to_a_tied_lm_head(tmp_path):
    fixture = FIXTURES["m2rnn-tiny"]
    src = tmp_path / "tied"
    src.mkdir()
    tensors = load_file(fixture / "model.safetensors")
    del tensors["lm_head.weight"]   # lm-engine has no lm_head module when the embeddings are tied
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    (src / "config.json").write_text(json.dumps({**fixture_config(fixture), "tie_word_embeddings": True}))
    dst = convert_lm_engine_checkpoint(src, tmp_path / "converted", progress=False)
    model = AutoModelForCausalLM.from_pretrained(dst)
    assert model.config.tie_word_embeddings
    assert torch.equal(model.lm_head.weight, tensors["transformer.wte.weight"])
    exported = export_lm_engine_checkpoint(dst, tmp_path / "exported", progress=False)
    assert json.loads((exported / "config.json").read_text())["tie_word_embeddings"]
    assert "lm_head.weight" not in load_file(exported / "model.safetensors")


def test_the_grouped_attention_projection_splits_per_kv_head():
    num_heads, num_kv_heads, head_dim, hidden = 6, 2, 3, 5
    q, k, v = torch.randn(num_heads * head_dim, hidden), torch.randn(2 * head_dim, hidden), torch.randn(6, hidden)
    group = num_heads // num_kv_heads
    # lm-engine's c_attn rows: for each KV head g, its group's query heads, then k_g, then v_g
    rows = []
    for g in range(num_kv_heads):
        rows += [q[g * group * head_dim:(g + 1) * group * head_dim], k[g * head_dim:(g + 1) * head_dim],
                 v[g * head_dim:(g + 1) * head_dim]]
    split = split_grouped_qkv(torch.cat(rows), num_heads, num_kv_heads, head_dim)
    for ours, expected in zip(split, (q, k, v)):
        assert torch.equal(ours, expected)


def test_swiglu_rows_interleaved_gate_first_split_into_gate_and_up():
    gate, up = torch.randn(2, 7, 5), torch.randn(2, 7, 5)
    interleaved = torch.stack([gate, up], dim=2).flatten(1, 2)   # (E, 2I, hidden): gate, up, gate, up, ...
    ours = split_interleaved_gate_up(interleaved, dim=1)
    assert torch.equal(ours[0], gate) and torch.equal(ours[1], up)


def test_the_config_translation_maps_each_field():
    config = fixture_config(FIXTURES["hybrid-m2rnn-tiny"])
    for block in config["sequence_mixer_blocks"]:
        if block["sequence_mixer_type"] == "m2rnn":
            block["gradient_clipping"] = -0.5   # lm-engine clips at |c|
        else:
            block["softmax_dropout"] = 0.1
    fields = translate_config(config)
    assert fields["layer_types"] == ["linear_attention", "full_attention", "linear_attention", "linear_attention",
                                     "full_attention", "linear_attention"]
    assert "mixer_types" not in fields and "mlp_layer_types" not in fields   # configs older versions read
    assert (fields["m2rnn_k_head_dim"], fields["m2rnn_v_head_dim"], fields["m2rnn_num_v_heads"]) == (16, 8, 6)
    assert fields["m2rnn_gradient_clipping"] == 0.5
    assert (fields["num_attention_heads"], fields["num_key_value_heads"], fields["head_dim"]) == (4, 4, 16)
    assert fields["attention_dropout"] == 0.1
    assert (fields["intermediate_size"], fields["hidden_act"], fields["rms_norm_eps"]) == (96, "silu", 1e-5)
    assert (fields["bos_token_id"], fields["eos_token_id"], fields["pad_token_id"]) == (255, 255, 254)


M2RNN_LAYER, ATTENTION_LAYER = 0, 1   # in the hybrid fixture
REFUSALS = [
    # (where in the config, option, value, words of the message)
    ("top", "model_type", "llama", "only lm-engine's 'gpt_base' models convert"),
    ("top", "m_emb", 12.0, "muP multipliers"),
    ("top", "m_width", 4.0, "muP multipliers"),
    ("top", "m_residual", 0.5, "muP multipliers"),
    ("top", "position_embedding_type", "rope", "only 'nope'"),
    ("top", "position_embedding_type", "learned_absolute", "only 'nope'"),
    ("top", "normalization_function", "layernorm", "only 'rmsnorm'"),
    ("top", "layer_norm_epsilon", 1e-6, "M2RNN output norm always uses eps 1e-05"),
    ("top", "some_new_feature", True, "an option this converter does not know"),
    ("mixer", "add_bias", True, "no biases"),
    ("mixer", "normalization_function", None, "only as 'rmsnorm'"),
    ("mixer", "activation_function", "gelu", "only with 'silu'"),
    ("mixer", "num_f_heads", 1, "converts only equal to the number of heads N = 6"),
    ("mixer", "num_g_heads", 3, "converts only equal to the number of heads N = 6"),
    ("mixer", "k_head_dim", 8, "differs between m2rnn layers"),
    ("mixer", "gradient_clipping", None, "differs between m2rnn layers"),
    ("mixer", "some_new_feature", "on", "an option this converter does not know"),
    ("mixer", "sequence_mixer_type", "mamba2", "only ['gated_deltanet', 'm2rnn', 'softmax_attention'] convert"),
    ("attention", "add_bias", True, "no biases"),
    ("attention", "sliding_window", 8, "our attention is global"),
    ("attention", "attention_gate", True, "no output gate"),
    ("attention", "exclusive_self_attention", True, "does not project out v"),
    ("attention", "use_qk_norm", True, "no q/k norm"),
    ("attention", "attention_multiplier_method", "1 / head_dim", "only '1 / sqrt(head_dim)'"),
    ("attention", "num_key_value_heads", 2, "differs between softmax_attention layers"),
    ("mlp", "activation_function", "gelu", "only 'swiglu'"),
    ("mlp", "add_bias", True, "our MLPs have no biases"),
    ("mlp", "mlp_type", "DeltaMLP", "only ['MLP', 'MoE'] convert"),
]


def _set_option(config: dict, where: str, option: str, value):
    if where == "top":
        config[option] = value
    elif where == "mixer":
        config["sequence_mixer_blocks"][M2RNN_LAYER][option] = value
    elif where == "attention":
        config["sequence_mixer_blocks"][ATTENTION_LAYER][option] = value
        if option == "attention_multiplier_method":
            config["sequence_mixer_blocks"][ATTENTION_LAYER]["attention_multiplier"] = None
    else:
        config["mlp_blocks"][0][option] = value


@pytest.mark.parametrize("where, option, value, message", REFUSALS, ids=[f"{r[1]}={r[2]}" for r in REFUSALS])
def test_an_option_we_cannot_represent_is_refused_by_name(tmp_path, where, option, value, message):
    fixture = FIXTURES["hybrid-m2rnn-tiny"]
    config = fixture_config(fixture)
    _set_option(config, where, option, value)
    with pytest.raises(ValueError, match=f"`[^`]*{option}` ") as error:
        convert_lm_engine_checkpoint(fixture, tmp_path / "converted", config=config, progress=False)
    assert message in str(error.value)
    assert not (tmp_path / "converted").exists()


def test_an_attention_multiplier_other_than_inverse_sqrt_head_dim_is_refused(tmp_path):
    config = fixture_config(FIXTURES["hybrid-m2rnn-tiny"])
    config["sequence_mixer_blocks"][ATTENTION_LAYER].update(attention_multiplier=0.5, attention_multiplier_method=None)
    with pytest.raises(ValueError, match=r"`sequence_mixer_blocks\[1\].attention_multiplier` = 0.5 .* only 1/sqrt"):
        convert_lm_engine_checkpoint(FIXTURES["hybrid-m2rnn-tiny"], tmp_path / "out", config=config, progress=False)


def test_an_explicit_multiplier_equal_to_inverse_sqrt_head_dim_converts(tmp_path):
    fixture = FIXTURES["hybrid-m2rnn-tiny"]
    config = fixture_config(fixture)
    for i in (1, 4):
        config["sequence_mixer_blocks"][i].update(attention_multiplier=16**-0.5, attention_multiplier_method=None)
    dst = convert_lm_engine_checkpoint(fixture, tmp_path / "converted", config=config, progress=False)
    assert_matches_lm_engine(dst, fixture)


def test_training_only_dropouts_are_dropped_with_a_warning(tmp_path):
    fixture = FIXTURES["m2rnn-tiny"]
    config = {**fixture_config(fixture), "embedding_dropout": 0.1}
    with pytest.warns(UserWarning, match="`embedding_dropout` = 0.1 only acts in training"):
        dst = convert_lm_engine_checkpoint(fixture, tmp_path / "converted", config=config, progress=False)
    assert_matches_lm_engine(dst, fixture)


def test_a_tensor_without_a_counterpart_is_refused_and_nothing_is_written(tmp_path):
    fixture = FIXTURES["m2rnn-tiny"]
    src = tmp_path / "biased"
    src.mkdir()
    tensors = load_file(fixture / "model.safetensors")
    tensors["transformer.h.0.sequence_mixer.input_projection.bias"] = torch.zeros(134)
    save_file(tensors, src / "model.safetensors")
    (src / "config.json").write_text((fixture / "config.json").read_text())
    with pytest.raises(ValueError, match="'transformer.h.0.sequence_mixer.input_projection.bias' has no counterpart"):
        convert_lm_engine_checkpoint(src, tmp_path / "converted", progress=False)
    assert not (tmp_path / "converted").exists()


def test_a_checkpoint_missing_a_tensor_is_refused(tmp_path):
    fixture = FIXTURES["m2rnn-tiny"]
    src = tmp_path / "incomplete"
    src.mkdir()
    tensors = load_file(fixture / "model.safetensors")
    del tensors["transformer.h.2.sequence_mixer.D"]
    save_file(tensors, src / "model.safetensors")
    (src / "config.json").write_text((fixture / "config.json").read_text())
    with pytest.raises(ValueError, match=r"lacks tensors our model needs: \['model.layers.2.m2rnn.D'\]"):
        convert_lm_engine_checkpoint(src, tmp_path / "converted", progress=False)


def test_a_destination_holding_files_is_refused_and_left_untouched(tmp_path):
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="`dst` = .* must be an empty folder or not exist yet"):
        convert_lm_engine_checkpoint(FIXTURES["m2rnn-tiny"], tmp_path / "dst", progress=False)
    assert [p.name for p in (tmp_path / "dst").iterdir()] == ["notes.txt"]
    assert (tmp_path / "dst" / "notes.txt").read_text() == "mine"


def test_an_empty_destination_folder_is_used(tmp_path):
    (tmp_path / "dst").mkdir()
    convert_lm_engine_checkpoint(FIXTURES["m2rnn-tiny"], tmp_path / "dst", progress=False)
    assert "model.layers.0.m2rnn.conv_weight" in load_file(tmp_path / "dst" / "model.safetensors")


def _assert_round_trip(lm_engine_dir, exported_dir):
    """The exported lm-engine checkpoint holds the original's tensors bit for bit and a config that means the same."""
    original = load_file(lm_engine_dir / "model.safetensors")
    exported = {}
    for path in exported_dir.glob("model*.safetensors"):
        exported.update(load_file(path))
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), name
    exported_config = json.loads((exported_dir / "config.json").read_text())
    assert translate_config(exported_config) == translate_config(fixture_config(lm_engine_dir))


@pytest.mark.parametrize("name", FIXTURES)
def test_a_converted_checkpoint_exports_back_to_lm_engine_bit_exactly(tmp_path, name):
    fixture = FIXTURES[name]
    ours = convert_lm_engine_checkpoint(fixture, tmp_path / "ours", progress=False)
    main(["--to", "lm-engine", str(ours), str(tmp_path / "exported"), "--no-progress"])
    _assert_round_trip(fixture, tmp_path / "exported")


def test_export_of_a_checkpoint_sharded_by_save_pretrained_keeps_fused_tensors_whole(tmp_path):
    fixture = FIXTURES["hybrid-m2rnn-tiny"]
    ours = convert_lm_engine_checkpoint(fixture, tmp_path / "ours", progress=False)
    # small shards split a layer's q, k, v (and gate, up) over two files: the export joins them again
    AutoModelForCausalLM.from_pretrained(ours).save_pretrained(tmp_path / "sharded", max_shard_size="60KB")
    assert len(json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())["weight_map"]) > 1
    dst = export_lm_engine_checkpoint(tmp_path / "sharded", tmp_path / "exported", progress=False)
    assert (dst / "model.safetensors.index.json").is_file()
    _assert_round_trip(fixture, dst)
    assert_matches_lm_engine(convert_lm_engine_checkpoint(dst, tmp_path / "again", progress=False), fixture)


def test_export_refuses_a_setting_lm_engine_cannot_hold(tmp_path):
    ours = convert_lm_engine_checkpoint(FIXTURES["hybrid-m2rnn-tiny"], tmp_path / "ours", progress=False)
    config = json.loads((ours / "config.json").read_text())
    (ours / "config.json").write_text(json.dumps({**config, "use_rope": True, "rope_parameters": {"rope_theta": 1e4}}))
    with pytest.raises(ValueError, match=r"`use_rope` = True cannot be written for lm-engine"):
        export_lm_engine_checkpoint(ours, tmp_path / "exported", progress=False)
    assert not (tmp_path / "exported").exists()


def test_a_checkpoint_given_for_the_wrong_direction_is_named_as_such(tmp_path):
    fixture = FIXTURES["m2rnn-tiny"]
    ours = convert_lm_engine_checkpoint(fixture, tmp_path / "ours", progress=False)
    with pytest.raises(ValueError, match="checkpoint of ours .*`--to lm-engine`"):
        convert_lm_engine_checkpoint(ours, tmp_path / "again", progress=False)
    with pytest.raises(ValueError, match="is an lm-engine checkpoint .*`--from lm-engine`"):
        export_lm_engine_checkpoint(fixture, tmp_path / "exported", progress=False)
    with pytest.raises(ValueError, match="holds no config.json"):
        export_lm_engine_checkpoint(tmp_path / "ours" / "..", tmp_path / "exported", progress=False)
    assert not (tmp_path / "again").exists() and not (tmp_path / "exported").exists()
