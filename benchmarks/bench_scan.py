"""Benchmark of the Triton scan kernels on a CUDA GPU.

    PYTHONPATH=. python benchmarks/bench_scan.py   (from the repository root)

1. Correctness on the GPU (check_scan_gpu.py): the Gluon kernels and their Triton twins vs the float64 reference;
   y, final state and every gradient, ‖out − ref‖ / ‖ref‖ against stated bounds. A failure stops the run before any
   timing.
2. One table: forward, forward+backward, decode step and peak extra memory at the paper's 400M shape
   (B=8, S=4096, Nq=Nk=1, K=64, N=84, V=16, bf16), the 7B shape (B=4, N=132), B=1 and B=32 at S=1024, beside the
   public reference kernel's figures (results/anchors), plus the torch reference loop at small S.
3. Launch settings compared at the 400M shape (forward, forward+backward, extra memory), each checked first: the
   longest part (every setting compiles its kernels), so it comes after the table.
Timings are triton.testing.do_bench medians on fresh non-zero random inputs. JSON and the printed log go to
benchmarks/results/bench_scan.{json,log} (and $OUT when set), replacing the previous run's. The package's path is
timed as fast_path chooses it; under M2RNN_SCAN_KERNELS=gluon, with every Gluon kernel, checked or not (the
correctness check above runs them first), beside the Triton twins.
"""

import argparse
import dataclasses
import json

import torch
import triton
from check_scan_gpu import check_correctness, kernels, make_inputs  # benchmarks/, the script's folder
from run_info import run_info, write_results

from modeling_m2rnn.kernels import m2rnn_scan
from modeling_m2rnn.kernels.m2rnn_scan import triton_scan
from modeling_m2rnn.kernels.m2rnn_scan.triton_scan import KernelConfig

GiB = 2**30
ANCHORS = {  # public reference kernel, H200 (results/anchors/reference_kernel_h200_2026-11-28.json): ms, ms, ms, GiB
    "400m_B8": dict(fwd=4.1006, fwdbwd=18.6037, decode=0.3021, fwdbwd_mem=5828.0 / 1024),
    "7b_B4": dict(fwd=3.9358, fwdbwd=16.1908, decode=0.2861, fwdbwd_mem=4628.3 / 1024),
    "400m_B1": dict(fwd=4.3932, fwdbwd=16.0407, decode=0.1149, fwdbwd_mem=952.6 / 1024),
}
# (B, N, S); Nq=Nk=1, K=64, V=16. The last: short sequences in a large batch, where the step chain that limits B=1
# matters less than the work of all programs in flight.
SHAPES = {"400m_B8": (8, 84, 4096), "7b_B4": (4, 132, 4096), "400m_B1": (1, 84, 4096), "400m_B32_S1024": (32, 84, 1024)}
TARGETS = ("400m_B8: fwd <= 1.0 ms, fwd+bwd <= 4.5 ms, extra memory <= 0.6 GiB; 7b_B4 and 400m_B32_S1024: "
           "fwd+bwd <= 4.5 ms; decode <= 0.03 ms at B=1")


def timed(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def peak_extra_gib(fn) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / GiB


def measure_shape(B, N, S=4096, backend="triton", timings_only=False) -> dict:
    q, k, v, W, f, _ = make_inputs(B, S, N, initial_state=False)
    leaves = [x.requires_grad_() for x in (q, k, v, W, f)]
    dy = torch.randn(B, S, N, 16, device="cuda", dtype=torch.bfloat16)

    def forward_inference():
        with torch.no_grad():
            return m2rnn_scan(q, k, v, W, f, gradient_clipping=1.0, backend=backend)

    def forward_training():
        return m2rnn_scan(*leaves, gradient_clipping=1.0, backend=backend)

    def forward_backward():
        y, _ = m2rnn_scan(*leaves, gradient_clipping=1.0, backend=backend)
        return torch.autograd.grad(y, leaves, dy)

    result = {
        "fwd_ms": timed(forward_inference),
        "fwd_train_ms": timed(forward_training),
        "fwdbwd_ms": timed(forward_backward),
    }
    if timings_only:
        return result
    result.update(fwd_mem_gib=peak_extra_gib(forward_inference), fwdbwd_mem_gib=peak_extra_gib(forward_backward))
    if backend == "triton":
        result.update(measure_decode(B, N))
    return result


def measure_decode(B, N) -> dict:
    """One token: S=1 with the state carried, eager (host launch included) and as a CUDA graph replay."""
    q, k, v, W, f, h0 = make_inputs(B, 1, N)

    def step():
        with torch.no_grad():
            return m2rnn_scan(q, k, v, W, f, h0, backend="triton")

    eager = timed(step)
    step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return {"decode_ms": eager, "decode_graph_ms": timed(graph.replay)}


def compare_configs(log) -> dict:
    """Launch settings at the 400M shape; returns the timings per setting."""
    configs = {
        "default": KernelConfig(),
        "no L2 prefetch": KernelConfig(prefetch=False),
        # At 64 rows the Gluon backward needs 255 registers to keep its loop out of local memory (its 168-register cap
        # spills 480 bytes a thread); one warp per head then, and 8 warps to an SM.
        "bwd 64 rows": KernelConfig(backward_rows=64, gluon_backward_max_registers=255),
        "bwd 16 rows": KernelConfig(backward_rows=16),
        "fwd 16 rows": KernelConfig(forward_rows=16),
        "fwd 64 rows": KernelConfig(forward_rows=64),
        "chunk 16": KernelConfig(chunk=16),
    }
    timings = {}
    run_config = triton_scan.CONFIG
    for name, config in configs.items():
        triton_scan.CONFIG = config
        passed = check_correctness(lambda line: None)["bf16_odd_dims"]["passed"]
        log(f"config {name}: correctness " + ("passed" if passed else "FAILED, not timed"))
        if not passed:
            continue
        timings[name] = {key: measure_shape(8, 84)[key] for key in ("fwd_ms", "fwdbwd_ms", "fwdbwd_mem_gib")}
        figures = ", ".join(f"{k}={v:.3f}" for k, v in timings[name].items())
        log(f"config {name} {dataclasses.asdict(config)}: " + figures)
    triton_scan.CONFIG = run_config
    return timings


def config_with(assignments: list[str]) -> KernelConfig:
    """KernelConfig with FIELD=VALUE assignments applied (booleans as true/false, other fields as their type)."""
    changes = {}
    types = {field.name: type(field.default) for field in dataclasses.fields(KernelConfig)}
    for assignment in assignments:
        name, _, value = assignment.partition("=")
        if name not in types:
            raise ValueError(f"--config {assignment!r}: expected FIELD=VALUE with FIELD one of {sorted(types)}")
        if types[name] is bool:
            if value.lower() not in ("true", "false"):
                raise ValueError(f"--config {assignment!r}: expected true or false")
            changes[name] = value.lower() == "true"
        else:
            changes[name] = types[name](value)
    return dataclasses.replace(KernelConfig(), **changes)


def table(results, twins, torch_small) -> str:
    rows = [f"{'shape':<10}{'fwd ms':>16}{'fwd+bwd ms':>18}{'decode ms':>16}{'graph':>8}{'fwd+bwd GiB':>18}",
            f"{'':<10}{'ours / anchor':>16}{'ours / anchor':>18}{'ours / anchor':>16}{'':>8}{'ours / anchor':>18}"]
    for name, r in results.items():
        a = ANCHORS.get(name)
        if a is None:  # no reference-kernel figure at this shape
            rows.append(f"{name:<10}{r['fwd_ms']:>7.3f}{'':>9}{r['fwdbwd_ms']:>8.3f}{'':>10}{r['decode_ms']:>7.4f}"
                        f"{'':>9}{r['decode_graph_ms']:>8.4f}{r['fwdbwd_mem_gib']:>8.3f}")
            continue
        rows.append(f"{name:<10}{r['fwd_ms']:>7.3f} / {a['fwd']:<6.2f}{r['fwdbwd_ms']:>8.3f} / {a['fwdbwd']:<7.2f}"
                    f"{r['decode_ms']:>7.4f} / {a['decode']:<6.3f}{r['decode_graph_ms']:>8.4f}"
                    f"{r['fwdbwd_mem_gib']:>8.3f} / {a['fwdbwd_mem']:<7.2f}")
    training_forward = ", ".join(f"{n} {r['fwd_train_ms']:.3f} ms" for n, r in results.items())
    rows.append(f"(training forward, checkpoints stored: {training_forward})")
    for name, r in twins.items():
        rows.append(f"Triton twins, same run: {name} fwd {r['fwd_ms']:.3f} ms, training fwd "
                    f"{r['fwd_train_ms']:.3f} ms, fwd+bwd {r['fwdbwd_ms']:.3f} ms")
    rows.append(f"torch reference loop, 400M shape, S={torch_small['S']}: fwd {torch_small['fwd_ms']:.2f} ms, "
                f"fwd+bwd {torch_small['fwdbwd_ms']:.2f} ms; "
                f"Triton at the same S: fwd {torch_small['triton_fwd_ms']:.3f} ms, "
                f"fwd+bwd {torch_small['triton_fwdbwd_ms']:.3f} ms")
    rows.append("targets: " + TARGETS)
    return "\n".join(rows)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-configs", action="store_true", help="skip the launch-settings comparison")
    parser.add_argument("--config", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="KernelConfig fields for the whole run, e.g. prefetch=false backward_rows=64")
    args = parser.parse_args()
    triton_scan.CONFIG = config_with(args.config)
    lines = []

    def log(line):
        print(line, flush=True)
        lines.append(line)

    def write():
        write_results("bench_scan.json", json.dumps(report, indent=1))
        write_results("bench_scan.log", "\n".join(lines) + "\n")

    torch.manual_seed(0)
    report = {
        **run_info(),
        "config": dataclasses.asdict(triton_scan.CONFIG),
        "correctness": check_correctness(log),
    }
    if not all(case["passed"] for case in report["correctness"].values()):
        write()
        raise SystemExit("correctness check FAILED (see above)")
    report["shapes"] = {name: measure_shape(B, N, S) for name, (B, N, S) in SHAPES.items()}
    report["triton_twins"] = {}
    if "gluon" in report["scan_kernels"].values():  # the figures above are a Gluon kernel's: the twins' beside them
        with kernels("triton"):
            report["triton_twins"] = {name: measure_shape(B, N, S, timings_only=True)
                                      for name, (B, N, S) in SHAPES.items()}
    small_s = 128
    small_torch = measure_shape(8, 84, S=small_s, backend="torch")
    small_triton = measure_shape(8, 84, S=small_s)
    report["torch_reference_small"] = {
        "S": small_s, "fwd_ms": small_torch["fwd_ms"], "fwdbwd_ms": small_torch["fwdbwd_ms"],
        "triton_fwd_ms": small_triton["fwd_ms"], "triton_fwdbwd_ms": small_triton["fwdbwd_ms"],
    }
    report["anchors"] = ANCHORS
    log(table(report["shapes"], report["triton_twins"], report["torch_reference_small"]))
    write()
    if not args.skip_configs:
        report["configs_400m_B8"] = compare_configs(log)
        write()


if __name__ == "__main__":
    main()
