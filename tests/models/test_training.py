"""Training the way transformers users do it, on the CPU: packed batches, PEFT LoRA, gradient checkpointing
with torch.compile.

Tolerances (float32 everywhere): losses within 1e-5; a gradient tensor within 1e-6 + 1e-4 · max|reference|
elementwise (seen: ≤ 5e-7 relative); logits within 1e-5 (merging LoRA into the weights rounds differently:
seen ~4e-6).
"""

import sys

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import DataCollatorWithFlattening

from modeling_m2rnn import M2RNNForCausalLM

from helpers import REPO_ROOT, random_ids, tiny_model

sys.path.insert(0, str(REPO_ROOT / "examples"))
import finetune  # noqa: E402  (examples/ is not a package)


def gradients(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_gradients_close(actual: dict, expected: dict, atol=1e-6, rtol=1e-4):
    assert actual.keys() == expected.keys()
    for name, grad in expected.items():
        bound = atol + rtol * grad.abs().max()
        assert (actual[name] - grad).abs().max() <= bound, name


@pytest.mark.parametrize("backend", ["torch", "triton"])   # triton: the kernels through the Triton interpreter
@pytest.mark.parametrize("kind", ["pure", "hybrid"])
def test_a_flattened_batch_gives_the_loss_and_gradients_of_its_sequences_one_by_one(kind, backend):
    # use_cache=False as for training (examples/finetune.py): transformers builds the packed attention mask
    # only when no cache is passed.
    model = tiny_model(kind, m2rnn_kernel_backend=backend, use_cache=False).train()
    sequences = [random_ids(n, seed=n).tolist() for n in (5, 1, 9, 3)]   # a 1-token sequence has no target
    batch = DataCollatorWithFlattening()([{"input_ids": s} for s in sequences])
    assert batch["input_ids"].shape == (1, 18)

    packed_loss = model(**batch).loss
    packed_loss.backward()
    packed_gradients = gradients(model)
    model.zero_grad()

    # the packed loss is the mean over every sequence's targets (all tokens but its first)
    num_targets = sum(len(s) - 1 for s in sequences)
    loss = 0.0
    for sequence in sequences:
        ids = torch.tensor([sequence])
        if len(sequence) > 1:
            loss = loss + model(ids, labels=ids).loss * (len(sequence) - 1) / num_targets
    loss.backward()

    assert abs(packed_loss.item() - loss.item()) < 1e-5
    assert_gradients_close(packed_gradients, gradients(model))


@pytest.mark.parametrize("packed", [False, True], ids=["batch", "packed"])
def test_the_triton_backend_trains_like_the_reference(monkeypatch, packed):
    """One training step on the Triton kernels (the short conv's and the scan's, through the interpreter) gives the
    loss and gradients of the PyTorch reference layers."""
    from modeling_m2rnn.kernels.short_conv import triton_whole_sequence

    conv_calls, kernel = [], triton_whole_sequence.short_conv_op
    monkeypatch.setattr(triton_whole_sequence, "short_conv_op", lambda *args: conv_calls.append(1) or kernel(*args))
    if packed:
        batch = DataCollatorWithFlattening()([{"input_ids": random_ids(n, seed=n).tolist()} for n in (5, 1, 9)])
    else:
        ids = torch.stack([random_ids(7, seed=1), random_ids(7, seed=2)])
        batch = dict(input_ids=ids, labels=ids)
    results = {}
    for backend in ("torch", "triton"):
        model = tiny_model("hybrid", m2rnn_kernel_backend=backend, use_cache=False).train()
        loss = model(**batch).loss
        loss.backward()
        results[backend] = loss.item(), gradients(model)
    assert len(conv_calls) == 2   # the hybrid's two M2RNN layers, on the Triton backend only
    assert abs(results["triton"][0] - results["torch"][0]) < 1e-5
    assert_gradients_close(results["triton"][1], results["torch"][1])
    model.double()(**batch)   # float64 keeps the exact PyTorch conv (the kernel computes in float32)
    assert len(conv_calls) == 2


LORA_TARGETS = ["in_proj", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_lora_trains_only_adapters_which_save_reload_and_merge(tmp_path):
    assert finetune.LORA_TARGET_MODULES == LORA_TARGETS   # the example adapts what is tested here
    base = tiny_model("hybrid", use_cache=False)
    base_weights = {name: p.detach().clone() for name, p in base.named_parameters()}
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS))
    # trainable names end in <module>.lora_A.default.weight
    adapted = {name.split(".")[-4] for name, p in model.named_parameters() if p.requires_grad}
    assert adapted == set(LORA_TARGETS)   # every target is found, in M2RNN, attention and MLP layers
    adapter_weights = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = random_ids(2, 12)
    model.train()
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()

    for name, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, adapter_weights[name]), f"{name} did not train"
    for name, p in model.get_base_model().named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, base_weights[name.replace(".base_layer", "")]), f"{name} changed"

    with torch.no_grad():
        logits = model(ids).logits
        base_logits = tiny_model("hybrid", use_cache=False)(ids).logits
    assert (logits - base_logits).abs().max() > 1e-3   # the adapters do change the model

    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_model("hybrid", use_cache=False), tmp_path).eval()
    with torch.no_grad():
        assert (reloaded(ids).logits - logits).abs().max() < 1e-5
        merged = reloaded.merge_and_unload()
        assert type(merged) is M2RNNForCausalLM
        assert (merged(ids).logits - logits).abs().max() < 1e-5


def test_compiled_training_step_with_gradient_checkpointing_matches_eager():
    # Inductor compiles C++ kernels on the CPU (~1 minute here): one M2RNN and one attention layer only.
    ids = random_ids(2, 6)
    results = []
    for compiled in (False, True):
        model = tiny_model("hybrid", use_cache=False, num_hidden_layers=2, layer_types=["m2rnn", "full_attention"])
        model.train().gradient_checkpointing_enable()
        forward = torch.compile(model, fullgraph=True) if compiled else model   # fullgraph: no silent eager parts
        loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), gradients(model)))
    (eager_loss, eager_gradients), (compiled_loss, compiled_gradients) = results
    assert abs(compiled_loss.item() - eager_loss.item()) < 1e-5
    assert_gradients_close(compiled_gradients, eager_gradients)
