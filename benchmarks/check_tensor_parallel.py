"""Tensor parallelism by heads (modeling_m2rnn/distributed/tensor_parallel.py) against one process, on tiny models.

    torchrun --standalone --nproc-per-node 2 benchmarks/check_tensor_parallel.py --output-dir DIR
    (on the CPU: gloo; set GLOO_SOCKET_IFNAME=lo where the host name does not resolve to a local address)

For each family (pure M2RNN; hybrid M2RNN + attention; Gated DeltaNet, M2RNN and attention layers with MoE
MLPs), the first rank saves a seeded float32 model; every rank loads it twice, whole and with
`DistributedConfig(tp_size=WORLD_SIZE)`, and compares the two: the logits of a forward (also with two sequences
packed in a row), the loss, the gradient norm and every parameter's gradient clipped to half of it
(`distributed.clip_grad_norm_`; the split ones put together), the tokens of a greedy generation from a left-padded
batch (with the dynamic and the static cache), and the checkpoint the split model saves (tensor for tensor, bit
for bit, with the one it was loaded from). The tiny models share some head counts (q and k; g, f or W; the GDN
norm weight) to exercise the blocks every rank holds whole. Writes DIR/check_tensor_parallel.json and exits
non-zero if a check fails.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from transformers.distributed import DistributedConfig  # noqa: E402

from modeling_m2rnn import M2RNNConfig, M2RNNForCausalLM  # noqa: E402
from modeling_m2rnn.distributed import clip_grad_norm_, gather_full_tensors  # noqa: E402

RTOL = 1e-5   # float32; the split model sums partial products in another order
OUTPUTS = ("logits_no_grad", "logits_packed", "loss", "logits", "gradient_norm")
EQUALITIES = ("split", "generation_equal", "static_cache_generation_equal", "checkpoint_equal")
# odd head sizes; a vocabulary the LM head's vocabulary-parallel style can split; initializer_range larger than a
# real model's, so that greedy decoding is far from ties
TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, m2rnn_k_head_dim=6, m2rnn_v_head_dim=5,
            m2rnn_num_q_heads=1, m2rnn_num_k_heads=1, m2rnn_conv_kernel_size=3,
            initializer_range=0.2, pad_token_id=0)
FAMILIES = {   # head counts that 2 and 4 ranks split; g (and f) grouped, W shared by all heads in the hybrid
    "m2rnn": dict(num_hidden_layers=2, m2rnn_num_v_heads=8, m2rnn_num_f_heads=4, m2rnn_num_g_heads=4,
                  m2rnn_num_weight_heads=8),
    "hybrid": dict(num_hidden_layers=3, layer_types=["m2rnn", "full_attention", "m2rnn"], num_attention_heads=8,
                   num_key_value_heads=4, head_dim=4, m2rnn_num_v_heads=8, m2rnn_num_f_heads=8,
                   m2rnn_num_g_heads=8, m2rnn_num_weight_heads=1),
    # Gated DeltaNet (one shared q and k head) beside M2RNN and attention, two MoE MLPs with a shared expert
    "hybrid_gdn_moe": dict(num_hidden_layers=3, layer_types=["gated_deltanet", "m2rnn", "full_attention"],
                           mlp_layer_types=["sparse", "dense", "sparse"], num_attention_heads=8,
                           num_key_value_heads=4, head_dim=4, m2rnn_num_v_heads=8, m2rnn_num_f_heads=8,
                           m2rnn_num_g_heads=8, m2rnn_num_weight_heads=8, gdn_num_heads=4, gdn_num_k_heads=1,
                           gdn_key_head_dim=6, gdn_value_head_dim=5, gdn_conv_kernel_size=3, num_experts=4,
                           num_experts_per_tok=2, moe_intermediate_size=12, shared_expert_intermediate_size=8),
}


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    value, reference = value.detach().double().cpu(), reference.detach().double().cpu()
    return ((value - reference).abs().max() / reference.abs().max().clamp_min(1e-30)).item()


def is_split(model, config: M2RNNConfig, world_size: int) -> bool:
    """Every layer holds its share: the M2RNN and GDN layers this rank's rows of their fused projections (the
    shared q and k rows whole), the experts their part of the intermediate width."""
    local_widths = []
    for layer in model.model.layers:
        if layer.mixer_type == "m2rnn":
            value_rows = (config.m2rnn_num_v_heads + config.m2rnn_num_g_heads) * config.m2rnn_v_head_dim
            expected = 2 * config.m2rnn_k_head_dim + (value_rows + config.m2rnn_num_f_heads) // world_size
            local_widths.append((layer.m2rnn.in_proj.weight.shape[0], expected))
        elif layer.mixer_type == "gated_deltanet":
            value_rows = config.gdn_num_heads * config.gdn_value_head_dim
            expected = 2 * config.gdn_key_head_dim + value_rows // world_size
            local_widths.append((layer.gated_deltanet.qkv_proj.weight.shape[0], expected))
        if hasattr(layer.mlp, "experts"):
            local = layer.mlp.experts.gate_up_proj.to_local()
            local_widths.append((local.shape[1], 2 * config.moe_intermediate_size // world_size))
    return all(width == expected for width, expected in local_widths)


def forward_and_gradients(model, input_ids, clip_grad_norm_):
    """Loss, logits, the gradient norm before clipping and the gradients clipped to half of it."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=input_ids, labels=input_ids)
    out.loss.backward()
    norm = clip_grad_norm_(model, float("inf")).detach()
    clip_grad_norm_(model, 0.5 * norm.item())
    gradients = {name: p.grad for name, p in model.named_parameters()}
    return out.loss.detach(), out.logits.detach(), norm, gradients


def check_family(name: str, config: M2RNNConfig, output_dir: Path, device: torch.device) -> dict:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    single_dir, split_dir = output_dir / name / "single", output_dir / name / "split"
    if rank == 0:
        torch.manual_seed(0)
        M2RNNForCausalLM(config).save_pretrained(single_dir)
    dist.barrier()

    single = M2RNNForCausalLM.from_pretrained(single_dir, dtype=torch.float32).to(device)
    split = M2RNNForCausalLM.from_pretrained(single_dir, dtype=torch.float32,
                                             distributed_config=DistributedConfig(tp_size=world_size))
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, config.vocab_size, (2, 11), generator=generator).to(device)
    report = {"split": is_split(split, config, world_size)}

    with torch.no_grad():
        report["logits_no_grad"] = relative_error(split(input_ids).logits, single(input_ids).logits)
        # two sequences packed in each row: positions restart, and so do the recurrence and the conv
        position_ids = torch.cat([torch.arange(5), torch.arange(6)]).expand(2, -1).to(device)
        report["logits_packed"] = relative_error(split(input_ids, position_ids=position_ids).logits,
                                                 single(input_ids, position_ids=position_ids).logits)

    loss, logits, norm, gradients = forward_and_gradients(
        single, input_ids, lambda model, max_norm: torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    )
    split_loss, split_logits, split_norm, split_gradients = forward_and_gradients(split, input_ids, clip_grad_norm_)
    split_gradients = gather_full_tensors(split, split_gradients)
    report["loss"] = relative_error(split_loss, loss)
    report["logits"] = relative_error(split_logits, logits)
    report["gradient_norm"] = relative_error(split_norm, norm)
    report["gradients"] = {key: relative_error(split_gradients[key], grad) for key, grad in gradients.items()}

    prompt = input_ids[:, :7].clone()
    prompt[0, :3] = config.pad_token_id
    attention_mask = (torch.arange(7, device=device) >= torch.tensor([[3], [0]], device=device)).long()
    generate = dict(attention_mask=attention_mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    tokens, split_tokens = single.generate(prompt, **generate), split.generate(prompt, **generate)
    report["generation_equal"] = torch.equal(tokens, split_tokens)
    generate["cache_implementation"] = "static"
    report["static_cache_generation_equal"] = torch.equal(tokens, split.generate(prompt, **generate))

    split.save_pretrained(split_dir)
    dist.barrier()
    saved, reference = load_file(split_dir / "model.safetensors"), load_file(single_dir / "model.safetensors")
    report["checkpoint_equal"] = saved.keys() == reference.keys() and all(
        saved[key].dtype == reference[key].dtype and torch.equal(saved[key], reference[key]) for key in reference
    )
    return report


def failures(report: dict) -> list[str]:
    problems = []
    for name, checks in report.items():
        errors = {key: checks[key] for key in OUTPUTS} | checks["gradients"]
        problems += [f"{name}: {key} off by {error:.2e}" for key, error in errors.items() if not error <= RTOL]
        problems += [f"{name}: {key} failed" for key in EQUALITIES if not checks[key]]
    return problems


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=REPO / "outputs" / "check_tensor_parallel")
    parser.add_argument("--kernel-backend", default="auto", help="m2rnn_kernel_backend of the models (default auto: "
                        "Triton on CUDA; 'triton' on the CPU needs TRITON_INTERPRET=1)")
    args = parser.parse_args()

    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    torch.use_deterministic_algorithms(True, warn_only=True)

    report = {}
    for name, family in FAMILIES.items():
        config = M2RNNConfig(**TINY, **family, m2rnn_kernel_backend=args.kernel_backend)
        report[name] = check_family(name, config, args.output_dir, device)
    problems = failures(report)
    if dist.get_rank() == 0:
        summary = {"world_size": dist.get_world_size(), "kernel_backend": args.kernel_backend, "rtol": RTOL,
                   "passed": not problems, "problems": problems, "families": report}
        (args.output_dir / "check_tensor_parallel.json").write_text(json.dumps(summary, indent=2))
        for name, checks in report.items():
            errors = [checks[key] for key in OUTPUTS] + list(checks["gradients"].values())
            worst = max(errors)
            print(f"{name}: largest relative error {worst:.2e} (logits, loss, {len(checks['gradients'])} gradients); "
                  f"generation equal: {checks['generation_equal']}; checkpoint equal: {checks['checkpoint_equal']}")
        print("\n".join(problems) if problems else "passed")
    dist.destroy_process_group()
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
