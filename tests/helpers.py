"""Helpers shared by the tests: tiny models, random token ids, padding, and the error measure of the kernel tests.
Imported as `helpers` (tests/conftest.py puts this directory on sys.path)."""

from pathlib import Path

import torch

from modeling_m2rnn import M2RNNConfig, M2RNNForCausalLM

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
