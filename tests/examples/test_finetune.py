"""The fine-tuning example (examples/finetune.py) for a few steps, alone and under torchrun with DDP on gloo."""

import json
import subprocess
import sys
import warnings

import torch
from transformers import AutoModelForCausalLM

from modeling_m2rnn import M2RNNForCausalLM

from helpers import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "examples"))
import finetune  # noqa: E402  (examples/ is not a package)


def run_finetune(*args):
    trainer = finetune.main(["--max-steps", "10", "--eval-fraction", "0.25", *args])
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert trainer.state.global_step == 10 and len(losses) == 10
    assert any("eval_loss" in entry for entry in trainer.state.log_history)
    return trainer


def test_finetune_example_runs_10_steps_and_saves_a_loadable_checkpoint(tmp_path):
    trainer = run_finetune("--output-dir", str(tmp_path))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(reloaded) is M2RNNForCausalLM
    trained = trainer.model.state_dict()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, trained[name]), name


def test_finetune_example_with_json_lines_packing_and_lora(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"body": doc}) + "\n" for doc in finetune.EMBEDDED_DOCUMENTS))
    # short documents: the reference scan walks a packed row one token at a time
    run_finetune("--data", str(data), "--text-field", "body", "--packing", "--seq-len", "16", "--lora",
                 "--lora-rank", "4", "--output-dir", str(tmp_path / "out"))
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged")
    assert type(merged) is M2RNNForCausalLM


def test_two_ddp_processes_on_gloo_log_the_losses_of_one_process(tmp_path):
    """benchmarks/check_multi_gpu.py --cpu: the example under torchrun with 2 processes of batch 2 against one
    process of batch 4 on the same data; it exits non-zero when a logged loss differs by more than 1e-3 (float32:
    seen ~2e-7). This is the check the 2-GPU DDP/FSDP2 runs use, minus FSDP2 (GPU-only in accelerate; FSDP2 itself
    is checked on gloo in tests/distributed/test_fsdp2.py)."""
    script = REPO_ROOT / "benchmarks" / "check_multi_gpu.py"
    command = [sys.executable, str(script), "--cpu", "--max-steps", "3", "--batch-size", "2", "--seq-len", "32",
               "--timeout", "120", "--output-dir", str(tmp_path)]   # each launch takes 10-40 s on 2 cores
    result = subprocess.run(command, capture_output=True, text=True)
    if "was still running after" in result.stdout:
        # a launch hangs now and then after saving, in its last barrier or teardown (seen in CI runs, not in 32
        # launches alone); a hang is retried once, a wrong loss never
        warnings.warn("a launch hung and was killed; retrying once:\n" + result.stdout[-3000:], stacklevel=1)
        result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "check_multi_gpu.json").read_text())
    assert report["passed"] and set(report["runs"]) == {"single", "ddp"}
    assert len(report["runs"]["ddp"]["loss"]) == 3
