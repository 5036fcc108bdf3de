"""Helpers shared by the tests: tiny models, random token ids, padding, the error measure of the kernel tests, and
a torchrun launch. Imported as `helpers` (tests/conftest.py puts this directory on sys.path)."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modeling_m2rnn import M2RNNCache, M2RNNConfig, M2RNNForCausalLM

REPO_ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Bounds of the Triton kernels against float64 references, for ‖out − ref‖ / ‖ref‖: float32 inputs compute in
# float32 (products in full float32): 1e-5 (seen: ~2e-7). bf16 inputs round outputs and gradients to bf16 (2^-9 per
# element): 1e-2 (seen: ~4e-3). fp16 inputs: 5e-3 (seen: ~3e-4 in the interpreter; the GPU's tanh.approx adds ~5e-4).
BOUND = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 5e-3}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


LAYER_TYPES = {
    "pure": ["m2rnn", "m2rnn", "m2rnn"],
    "hybrid": ["m2rnn", "full_attention", "m2rnn"],
}


def tiny_config(kind: str = "hybrid", **overrides) -> M2RNNConfig:
    fields = dict(
        vocab_size=61,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        layer_types=LAYER_TYPES[kind],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        m2rnn_k_head_dim=6,
        m2rnn_v_head_dim=5,
        m2rnn_num_q_heads=1,
        m2rnn_num_k_heads=1,
        m2rnn_num_v_heads=4,
        m2rnn_num_f_heads=4,
        m2rnn_num_g_heads=2,
        m2rnn_num_weight_heads=2,
        m2rnn_conv_kernel_size=3,
        initializer_range=0.2,   # larger than a real model's, so that logits are far from ties
        pad_token_id=0,
    )
    return M2RNNConfig(**{**fields, **overrides})


def tiny_model(kind: str = "hybrid", seed: int = 0, **overrides) -> M2RNNForCausalLM:
    torch.manual_seed(seed)
    return M2RNNForCausalLM(tiny_config(kind, **overrides)).eval()


def random_ids(*shape, seed=0, vocab=61):
    return torch.randint(1, vocab, shape, generator=torch.Generator().manual_seed(seed))


KINDS = ["pure", "hybrid"]




def left_pad(prompts, pad_id=0):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    return ids, mask


@torch.no_grad()
def cache_after(model, prompt: torch.Tensor) -> M2RNNCache:
    """A fresh M2RNNCache holding `model`'s state after `prompt` (batch, tokens), run without gradients."""
    cache = M2RNNCache(model.config)
    with torch.no_grad():
        model(prompt, past_key_values=cache)
    return cache


def decode_in_pieces(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, M2RNNCache]:
    """ids (B, 13): one full forward's logits, and the logits of the same tokens fed through a cache as a 4-token
    prefill, five one-token decode steps and a 4-token continuation, concatenated; and that cache."""
    full = model(ids, use_cache=False).logits
    cache = M2RNNCache(model.config)
    pieces = [model(ids[:, :4], past_key_values=cache, use_cache=True).logits]                # prefill
    pieces += [model(ids[:, t : t + 1], past_key_values=cache).logits for t in range(4, 9)]   # decode steps
    pieces.append(model(ids[:, 9:], past_key_values=cache).logits)                            # continuation
    return full, torch.cat(pieces, dim=1), cache


@torch.no_grad()
def assert_packed_rows_equal_sequences_alone(model) -> None:
    """Two rows of packed sequences (position ids restarting at 0) give each sequence the logits it gets alone."""
    lengths = [[4, 1, 6], [3, 8]]
    sequences = [[random_ids(n, seed=10 * r + i) for i, n in enumerate(row)] for r, row in enumerate(lengths)]
    ids = torch.stack([torch.cat(row) for row in sequences])
    position_ids = torch.stack([torch.cat([torch.arange(len(s)) for s in row]) for row in sequences])
    packed = model(ids, position_ids=position_ids, use_cache=False).logits
    for r, row in enumerate(sequences):
        start = 0
        for sequence in row:
            alone = model(sequence[None], use_cache=False).logits[0]
            assert (packed[r, start : start + len(sequence)] - alone).abs().max() < 1e-5
            start += len(sequence)


REMOTE_CODE_INPUT = [[3, 1, 4, 1, 5, 9, 2, 6]]
REMOTE_CODE_SCRIPT = f"""
import sys, torch
sys.modules["modeling_m2rnn"] = None   # the package must not be importable: only the checkpoint's code may run
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
assert eval(sys.argv[3]), sys.argv[3]
with torch.no_grad():
    torch.save(model(torch.tensor({REMOTE_CODE_INPUT})).logits, sys.argv[2])
"""


def logits_through_remote_code(checkpoint: Path, tmp_path: Path, check: str = "True") -> torch.Tensor:
    """The logits for REMOTE_CODE_INPUT of `checkpoint` loaded with trust_remote_code in a fresh process in which the
    package cannot be imported; `check`, a Python expression about `model`, must hold there. The process computes
    with as many threads as this one, so that its sums run in the same order and the logits can be compared exactly."""
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_CODE_SCRIPT, str(checkpoint), str(tmp_path / "logits.pt"), check],
        check=False, capture_output=True, text=True, cwd=tmp_path,
        env={"HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
             "OMP_NUM_THREADS": str(torch.get_num_threads())},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(tmp_path / "logits.pt")


def run_on_two_gloo_ranks(script: Path, *args: str, timeout: int = 240) -> str:
    """`script` under torchrun with 2 CPU processes on gloo (one thread each); its output. Fails the test with the
    output's end if it exits non-zero or still runs after `timeout` seconds (a launch takes ~10-30 s on 2 cores)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
               CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")   # gloo otherwise binds to the host name's address
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
               *args]
    with subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, start_new_session=True) as launch:
        try:
            output, _ = launch.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(launch.pid, signal.SIGKILL)   # torchrun's workers are in its session
            output, _ = launch.communicate()
            pytest.fail(f"the launch was still running after {timeout} s:\n{output[-3000:]}")
    if launch.returncode != 0:
        pytest.fail(output[-5000:])
    return output
