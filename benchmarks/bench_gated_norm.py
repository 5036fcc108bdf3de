"""The M2RNN layer's output gate and norm at the 400M layer's shape (B=8, S=4096, N=84, V=16, bf16 y, v, g): the
Triton kernels (kernels.gated_rms_norm) at a few launch settings against the PyTorch code compiled by inductor.

    PYTHONPATH=. python benchmarks/bench_gated_norm.py

Prints the GPU time of a forward and of a forward+backward call: the kernels' own time from torch.profiler, so that
host time (the autograd of a custom op takes longer on the host than its kernels on the GPU here) does not count; in
a training step the GPU is queued ahead of the host. JSON to benchmarks/results/bench_gated_norm.json (replacing the
previous run's) and to $OUT when set.
"""

import json

import torch
from run_info import write_results  # benchmarks/, the script's folder
from torch.profiler import ProfilerActivity, profile

from modeling_m2rnn.kernels import gated_rms_norm, gated_rms_norm_reference
from modeling_m2rnn.kernels.gated_norm import triton as triton_gated_norm

SHAPE = (8, 4096, 84, 16)
SETTINGS = [dict(FORWARD_TILE=forward_tile, BACKWARD_ROWS=rows, WARPS=warps)
            for forward_tile, rows, warps in ((2, 32, 8), (1, 32, 8), (2, 64, 8), (2, 16, 8), (1, 32, 4))]


def inputs() -> dict:
    generator = torch.Generator(device="cuda").manual_seed(0)
    tensors = {name: torch.randn(*SHAPE, generator=generator, device="cuda").bfloat16() for name in ("y", "g", "v")}
    tensors.update(weight=torch.ones(SHAPE[2] * SHAPE[3], device="cuda"), D=torch.ones(SHAPE[2:], device="cuda"))
    return {name: x.requires_grad_() for name, x in tensors.items()}


def compiled_pytorch():
    """The layer's PyTorch code under autocast, as the compiled training step runs it (out cast for out_proj)."""

    def gate_and_norm(y, g, weight, v, D):
        return gated_rms_norm_reference(y, g, weight, 1e-6, v, D).bfloat16()

    return torch.compile(gate_and_norm)


def fused(y, g, weight, v, D):
    return gated_rms_norm(y, g, weight, 1e-6, v, D, out_dtype=torch.bfloat16, backend="triton")


def gpu_ms(call, repeats: int = 20) -> float:
    """Milliseconds of kernel time per call, after a warm-up call."""
    call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            call()
        torch.cuda.synchronize()
    return sum(event.self_device_time_total for event in prof.key_averages()) / repeats / 1e3


def timings(fn, tensors: dict) -> dict:
    dout = torch.randn(*SHAPE[:2], SHAPE[2] * SHAPE[3], device="cuda").bfloat16()
    leaves = list(tensors.values())

    def forward():
        with torch.no_grad():
            fn(**tensors)

    def forward_backward():
        torch.autograd.grad(fn(**tensors), leaves, dout)

    return dict(forward_ms=gpu_ms(forward), forward_backward_ms=gpu_ms(forward_backward))


def main():
    tensors = inputs()
    results = {"pytorch_compiled": timings(compiled_pytorch(), tensors)}
    for setting in SETTINGS:
        for name, value in setting.items():
            setattr(triton_gated_norm, name, value)
        results["triton " + " ".join(f"{name.lower()}={value}" for name, value in setting.items())] = timings(
            fused, tensors)
    print(f"{'gate and norm, 400M layer, B=8 S=4096, GPU time':<75} {'forward ms':>11} {'fwd+bwd ms':>11}")
    for name, result in results.items():
        print(f"{name:<75} {result['forward_ms']:>11.4f} {result['forward_backward_ms']:>11.4f}")
    write_results("bench_gated_norm.json", json.dumps(dict(shape=SHAPE, results=results), indent=1))


if __name__ == "__main__":
    main()
