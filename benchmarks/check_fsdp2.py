"""FSDP2 (`torch.distributed.fsdp.fully_shard`), one shard group per decoder layer, against one process.

    torchrun --standalone --nproc-per-node 2 benchmarks/check_fsdp2.py --output-dir DIR
    (on the CPU: gloo; set GLOO_SOCKET_IFNAME=lo where the host name does not resolve to a local address)

The tiny float32 model of Gated DeltaNet, M2RNN and attention layers with MoE MLPs (check_tensor_parallel.py's
`hybrid_gdn_moe`, router aux loss on) is sharded the way transformers' and accelerate's wrap policy does it: every
module class in `model._no_split_modules` (the decoder layer), then the root. Each rank trains on its own rows of a
batch; an unsharded copy of the same weights on every rank takes the mean of the ranks' losses, which is what the
sharded model's averaged gradients are the gradient of. Compared, with and without gradient checkpointing: the loss,
every parameter's gradient (the shards put together) and, after one AdamW step, every parameter and the next loss.
Writes DIR/check_fsdp2.json and exits non-zero if a check fails.
"""

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from check_tensor_parallel import FAMILIES, TINY, relative_error  # (puts the repository on sys.path too)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from modeling_m2rnn import M2RNNConfig, M2RNNForCausalLM

RTOL = 1e-5   # float32; the shards' gradients are averaged by a reduce-scatter, in another order than one sum
ROWS_PER_RANK, SEQ_LEN = 2, 9


def shard_by_decoder_layer(model: M2RNNForCausalLM, mesh) -> M2RNNForCausalLM:
    layer_classes = tuple({type(m) for m in model.modules() if type(m).__name__ in model._no_split_modules})
    for module in model.modules():
        if isinstance(module, layer_classes):
            fully_shard(module, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def check(config: M2RNNConfig, gradient_checkpointing: bool, mesh, device: torch.device) -> dict:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    with device:
        reference = M2RNNForCausalLM(config).train()
    sharded = copy.deepcopy(reference)
    if gradient_checkpointing:
        sharded.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    shard_by_decoder_layer(sharded, mesh)
    unsharded = [name for name, p in sharded.named_parameters() if not hasattr(p, "full_tensor")]
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (sharded, reference)]
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(1, config.vocab_size, (ROWS_PER_RANK * world_size, SEQ_LEN), generator=generator)
               for _ in range(2)]

    def losses(ids):
        ids = ids.to(device)
        mine = ids[rank::world_size]
        loss = sharded(input_ids=mine, labels=mine).loss
        reference_loss = sum(reference(input_ids=ids[r::world_size], labels=ids[r::world_size]).loss
                             for r in range(world_size)) / world_size
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        return loss, reference_loss, mean / world_size

    loss, reference_loss, mean_loss = losses(batches[0])
    loss.backward()
    reference_loss.backward()
    pairs = list(zip(sharded.named_parameters(), reference.parameters()))
    report = {"unsharded_parameters": unsharded, "loss": relative_error(mean_loss, reference_loss),
              "gradients": max(relative_error(full(p.grad), q.grad) for (_, p), q in pairs)}
    for optimizer in optimizers:
        optimizer.step()
        optimizer.zero_grad()
    report["parameters_after_a_step"] = max(relative_error(full(p.detach()), q.detach()) for (_, p), q in pairs)
    with torch.no_grad():
        _, reference_loss, mean_loss = losses(batches[1])
    report["next_loss"] = relative_error(mean_loss, reference_loss)
    return report


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, required=True)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    config = M2RNNConfig(**TINY, **FAMILIES["hybrid_gdn_moe"], output_router_logits=True, use_cache=False)

    cases = {name: check(config, checkpointing, mesh, device)
             for name, checkpointing in (("plain", False), ("gradient_checkpointing", True))}
    problems = [f"{name}: {key} {error:.1e} > {RTOL:.0e}" for name, case in cases.items()
                for key, error in case.items() if isinstance(error, float) and error > RTOL]
    problems += [f"{name}: {case['unsharded_parameters']} not sharded" for name, case in cases.items()
                 if case["unsharded_parameters"]]
    if dist.get_rank() == 0:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        summary = {"world_size": dist.get_world_size(), "device": device.type, "bound": RTOL,
                   "passed": not problems, "problems": problems, "cases": cases}
        (args.output_dir / "check_fsdp2.json").write_text(json.dumps(summary, indent=2))
        print(json.dumps(cases, indent=1))
        print("\n".join(problems) if problems else "passed")
    dist.destroy_process_group()
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
