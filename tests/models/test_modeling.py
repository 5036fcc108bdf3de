"""The transformers model end to end on the CPU: padding, packing, checkpoints, outputs, training with Trainer."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from modeling_m2rnn import M2RNNCache, M2RNNForCausalLM

from helpers import KINDS, assert_packed_rows_equal_sequences_alone, left_pad, random_ids, tiny_config, tiny_model


@pytest.mark.parametrize("kind", KINDS)
def test_left_padded_batch_equals_each_prompt_alone(kind):
    model = tiny_model(kind)
    prompts = [random_ids(n, seed=n) for n in (5, 9, 2)]
    ids, mask = left_pad(prompts)
    with torch.no_grad():
        batch_logits = model(ids, attention_mask=mask).logits[:, -1]
    batch_tokens = model.generate(ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6)
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            alone_logits = model(prompt[None]).logits[:, -1]
        assert (batch_logits[row] - alone_logits[0]).abs().max() < 1e-4
        alone_tokens = model.generate(prompt[None], max_new_tokens=6, min_new_tokens=6)
        assert torch.equal(batch_tokens[row, -6:], alone_tokens[0, -6:])


def test_padding_inside_a_continuation_leaves_the_state_untouched():
    model = tiny_model("pure")
    ids = random_ids(1, 10, seed=3)
    with torch.no_grad():
        cache = M2RNNCache(model.config)
        model(ids[:, :4], past_key_values=cache)
        # the next chunk is two padding tokens then real ones, as a right-aligned batch row would be
        chunk = torch.cat([torch.zeros(1, 2, dtype=torch.long), ids[:, 4:7]], dim=1)
        mask = torch.cat([torch.ones(1, 4), torch.zeros(1, 2), torch.ones(1, 3)], dim=1).long()
        padded = model(chunk, attention_mask=mask, past_key_values=cache).logits[:, -1]
        expected = model(ids[:, :7], use_cache=False).logits[:, -1]
    assert (padded - expected).abs().max() < 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_packed_rows_equal_their_sequences_run_alone(kind):
    assert_packed_rows_equal_sequences_alone(tiny_model(kind))


def test_save_and_load_round_trip_bit_exactly(tmp_path):
    model = tiny_model("hybrid")
    ids = random_ids(2, 7)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is M2RNNForCausalLM
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    base = AutoModel.from_pretrained(tmp_path)
    assert type(base).__name__ == "M2RNNModel"


def test_bfloat16_loading_keeps_the_decay_parameters_in_float32(tmp_path):
    model = tiny_model("hybrid")
    model.save_pretrained(tmp_path)
    bf16 = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    mixer = bf16.model.layers[0].m2rnn
    assert mixer.in_proj.weight.dtype == torch.bfloat16 and mixer.W.dtype == torch.bfloat16
    assert mixer.A_log.dtype == torch.float32 and mixer.dt_bias.dtype == torch.float32
    ids = random_ids(1, 9)
    with torch.no_grad():
        logits = bf16(ids).logits.float()
        reference = model(ids).logits
    assert ((logits - reference).norm() / reference.norm()) < 3e-2   # bf16 weights and activations


def test_bf16_autocast_with_padding_keeps_bf16_activations():
    """Float32 weights must not promote bf16 activations in the short conv (the scan would then run in float32)."""
    model = tiny_model("hybrid").train()
    ids, mask = left_pad([random_ids(5, seed=1), random_ids(9, seed=2)])
    seen = []
    model.model.layers[0].m2rnn.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    loss.backward()
    reference = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    assert seen[0] == torch.bfloat16
    assert abs(loss.item() - reference.item()) / reference.item() < 2e-2


def test_parameters_missing_from_a_checkpoint_are_initialised_not_garbage(tmp_path):
    model = tiny_model("pure")
    custom = ("A_log", "dt_bias", ".W", ".D", "conv_weight")
    state = {k: v for k, v in model.state_dict().items() if not k.endswith(custom)}
    model.save_pretrained(tmp_path, state_dict=state)
    assert not any(k.endswith(custom) for k in load_file(tmp_path / "model.safetensors"))

    config = model.config
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for layer in reloaded.model.layers:
        mixer = layer.m2rnn
        assert torch.equal(mixer.W, torch.eye(5).expand(2, 5, 5))
        assert torch.equal(mixer.D, torch.ones(4, 5))
        A = mixer.A_log.exp()
        assert ((A >= 1e-4 * 0.999) & (A <= config.m2rnn_A_init_max)).all()
        dt = torch.nn.functional.softplus(mixer.dt_bias)
        assert ((dt >= config.m2rnn_dt_init_floor * 0.999) & (dt <= config.m2rnn_dt_init_max * 1.001)).all()
        bound = 1 / 3**0.5
        assert mixer.conv_weight.abs().max() <= bound and mixer.conv_weight.std() > 0.1
    # what was in the checkpoint is loaded as saved
    assert torch.equal(reloaded.model.layers[0].m2rnn.in_proj.weight, model.model.layers[0].m2rnn.in_proj.weight)


REMOTE_CODE_SCRIPT = """
import sys, torch
sys.modules["modeling_m2rnn"] = None   # the package must not be importable: only the checkpoint's code may run
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
assert "modeling_m2rnn" not in type(model).__module__.split(".")[0], type(model).__module__
ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
with torch.no_grad():
    torch.save(model(ids).logits, sys.argv[2])
"""


def test_a_saved_checkpoint_loads_with_trust_remote_code_without_the_package(tmp_path):
    model = tiny_model("hybrid")
    model.register_for_auto_class("AutoModelForCausalLM")   # transformers' habit; the export needs no registration
    model.save_pretrained(tmp_path / "checkpoint")
    auto_map = json.loads((tmp_path / "checkpoint" / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForCausalLM"] == "modeling_m2rnn.M2RNNForCausalLM"
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_CODE_SCRIPT, str(tmp_path / "checkpoint"), str(tmp_path / "logits.pt")],
        capture_output=True, text=True, cwd=tmp_path, env={"HF_MODULES_CACHE": str(tmp_path / "modules"),
                                                           "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with torch.no_grad():
        expected = model(torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])).logits
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)


def test_outputs_logits_to_keep_and_loss_like_transformers_models():
    model = tiny_model("hybrid", attn_implementation="eager")   # sdpa returns no attention weights
    ids = random_ids(2, 9)
    labels = ids.clone()
    labels[0, :3] = -100
    out = model(ids, labels=labels, output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == 4 and out.hidden_states[0].shape == (2, 9, 32)
    assert len(out.attentions) == 1 and out.attentions[0].shape == (2, 4, 9, 9)
    shifted_logits, shifted_labels = out.logits[:, :-1].reshape(-1, 61), labels[:, 1:].reshape(-1)
    expected = torch.nn.functional.cross_entropy(shifted_logits, shifted_labels, ignore_index=-100)
    assert torch.allclose(out.loss, expected, atol=1e-6)
    summed = torch.nn.functional.cross_entropy(shifted_logits, shifted_labels, ignore_index=-100, reduction="sum")
    with_count = model(ids, labels=labels, num_items_in_batch=torch.tensor(40))
    assert torch.allclose(with_count.loss, summed / 40, atol=1e-5)
    assert model(ids, logits_to_keep=1).logits.shape == (2, 1, 61)
    assert not model(ids, return_dict=False)[0].isnan().any()


def test_eager_and_sdpa_attention_agree():
    eager = tiny_model("hybrid", attn_implementation="eager")
    sdpa = tiny_model("hybrid", attn_implementation="sdpa")
    assert sdpa.config._attn_implementation == "sdpa"
    ids = random_ids(2, 10)
    with torch.no_grad():
        assert (eager(ids).logits - sdpa(ids).logits).abs().max() < 1e-5


def test_rope_changes_the_attention_and_nope_is_the_default():
    assert not tiny_config("hybrid").use_rope
    ids = random_ids(1, 10)
    with torch.no_grad():
        nope = tiny_model("hybrid")(ids).logits
        rope = tiny_model("hybrid", use_rope=True, rope_parameters={"rope_theta": 100.0})(ids).logits
    assert (nope - rope).abs().max() > 1e-3


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = random_ids(2, 11)
    gradients = []
    for checkpointing in (False, True):
        model = tiny_model("hybrid").train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(ids, labels=ids).loss.backward()
        gradients.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, grad in gradients[0].items():
        assert (grad - gradients[1][name]).abs().max() < 1e-5, name


def test_sequence_classification_reads_the_last_real_token():
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(tiny_config("hybrid", num_labels=3)).eval()
    ids, mask = left_pad([random_ids(4, seed=1), random_ids(7, seed=2)])
    ids[0, -1], mask[0, -1] = 0, 1   # transformers picks the last non-pad token on the right
    out = model(ids, attention_mask=mask, labels=torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3) and out.loss.isfinite()


def test_bad_model_input_raises_a_clear_value_error():
    model = tiny_model("pure")
    with pytest.raises(ValueError, match="exactly one of"):
        model(random_ids(1, 3), inputs_embeds=torch.randn(1, 3, 32))
    with pytest.raises(ValueError, match="batch, seq_len"):
        model(random_ids(3))
    with pytest.raises(ValueError, match="inputs_embeds"):
        model(inputs_embeds=torch.randn(1, 3, 31))


def test_trainer_lowers_the_loss_in_20_steps(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    # a pattern a tiny model learns fast: each row counts upward from a random start, modulo the vocabulary
    starts = torch.randint(1, 61, (64, 1), generator=torch.Generator().manual_seed(0))
    rows = (starts + torch.arange(16)) % 60 + 1
    dataset = Dataset.from_dict({"input_ids": rows.tolist(), "labels": rows.tolist()})
    model = tiny_model("hybrid", initializer_range=0.02).train()
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=20, per_device_train_batch_size=8, learning_rate=1e-2,
        logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 20
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses
