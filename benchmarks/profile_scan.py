"""Where a step of each scan kernel spends its time on the GPU: Nsight Compute's stall sampling per loop.

    PYTHONPATH=. python benchmarks/profile_scan.py [--batch 8 --seq-len 256 --heads 84] [--output DIR]

Runs one training forward and its backward (bf16, Nq=Nk=1, K=64, V=16, gradient clipping 1.0) under `ncu`
with its source counters, after one unprofiled warm-up, and prints for the forward and the backward kernel,
for every loop (innermost first: the forward's step loop; the backward's replay and walk of a chunk): its
share of the kernel's warp samples, the stall reasons of those samples, and the instructions that collect
the most. Scheduler and occupancy figures follow. The stall reasons (Nsight Compute's names): long_sb,
waiting for a global load; short_sb, for shared memory, shuffles or the special-function unit; wait, a fixed
latency (the instruction before it); selected, issuing (the warp is bound by how many instructions it
has); not_selected, another warp issued; barrier, mio, math, dispatch: their units.

Writes scan_profile.ncu-rep, scan_profile_source.csv and profile_scan.txt to --output (benchmarks/results).
"""

import argparse
import csv
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

KERNELS = "regex:scan_(forward|backward)(_gluon)?_kernel"
SECTIONS = ("SourceCounters", "WarpStateStats", "SchedulerStats", "Occupancy", "LaunchStats")


def launch(batch: int, seq_len: int, heads: int):
    """A training forward and its backward, twice (the first compiles); ncu profiles the second."""
    import torch

    from modeling_m2rnn.kernels import m2rnn_scan

    torch.manual_seed(0)
    device = "cuda"
    q = torch.randn(batch, seq_len, 1, 64, device=device, dtype=torch.bfloat16) / 8
    k = torch.randn(batch, seq_len, 1, 64, device=device, dtype=torch.bfloat16) / 8
    v = torch.randn(batch, seq_len, heads, 16, device=device, dtype=torch.bfloat16)
    W = (torch.randn(heads, 16, 16, device=device) / 4).to(torch.bfloat16)
    f = torch.rand(batch, seq_len, heads, device=device) * 0.5 + 0.45
    leaves = [x.requires_grad_() for x in (q, k, v, W, f)]
    for _ in range(2):
        y, _ = m2rnn_scan(*leaves, gradient_clipping=1.0, backend="triton")
        torch.autograd.grad(y, leaves, torch.randn_like(y))
    torch.cuda.synchronize()


def find_ncu() -> str:
    for candidate in (shutil.which("ncu"), "/usr/local/cuda/bin/ncu"):
        if candidate and Path(candidate).exists():
            return candidate
    raise SystemExit("ncu (Nsight Compute) not found on PATH or in /usr/local/cuda/bin")


def read_source_csv(path: Path) -> list[dict]:
    """[{name, instructions: [row dicts]}] from `ncu --page source --csv --print-source sass`."""
    kernels, header = [], None
    with open(path) as file:
        for row in csv.reader(file):
            if not row:
                continue
            if row[0] == "Kernel Name":
                kernels.append({"name": row[1], "instructions": []})
            elif row[0] == "Address":
                header = row
            elif row[0].startswith("0x") and kernels:
                kernels[-1]["instructions"].append(dict(zip(header, row)))
    return kernels


def samples(instruction: dict, column: str = "Warp Stall Sampling (All Samples)") -> int:
    return int(instruction.get(column) or 0)


def loops(instructions: list[dict]) -> list[tuple[int, int]]:
    """(first, last) index of the body of every backward branch, innermost (shortest) first."""
    addresses = [int(x["Address"], 16) for x in instructions]
    index = {address: i for i, address in enumerate(addresses)}
    bodies = []
    for i, x in enumerate(instructions):
        match = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", x["Source"])
        if match:
            target = int(match.group(1), 16)
            target = target if target in index else addresses[0] + target  # absolute or relative to the kernel
            if target in index and index[target] <= i:
                bodies.append((index[target], i))
    return sorted(set(bodies), key=lambda body: body[1] - body[0])


def report(kernel: dict) -> list[str]:
    instructions = kernel["instructions"]
    reasons = [c for c in instructions[0] if c.startswith("stall_") and "Not Issued" not in c]
    total = sum(samples(x) for x in instructions) or 1
    lines = [f"{kernel['name']}: {len(instructions)} instructions, {total} warp samples"]
    for first, last in loops(instructions):
        body = instructions[first:last + 1]
        body_samples = sum(samples(x) for x in body)
        if body_samples < 0.02 * total:
            continue
        by_reason = Counter({r[len("stall_"):]: sum(samples(x, r) for x in body) for r in reasons})
        share = ", ".join(f"{r} {100 * n / body_samples:.0f}%" for r, n in by_reason.most_common(7))
        lines.append(f"  loop of {len(body)} instructions, run {samples(body[0], 'Instructions Executed')} times: "
                     f"{100 * body_samples / total:.0f}% of samples; {share}")
        for x in sorted(body, key=samples, reverse=True)[:8]:
            top = max(reasons, key=lambda r: samples(x, r))
            lines.append(f"    {samples(x):6d}  {x['Source'].strip()[:64]:64s} {top[len('stall_'):]}")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--heads", type=int, default=84)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--launch", action="store_true", help=argparse.SUPPRESS)  # the process ncu profiles
    args = parser.parse_args()
    shape = ["--batch", str(args.batch), "--seq-len", str(args.seq_len), "--heads", str(args.heads)]
    if args.launch:
        launch(args.batch, args.seq_len, args.heads)
        return

    ncu = find_ncu()
    args.output.mkdir(parents=True, exist_ok=True)
    profile = args.output / "scan_profile"
    # The clocks as the benchmarks run them: ncu would otherwise lock them to base for the profile.
    command = [ncu, "--clock-control", "none", "--kernel-name", KERNELS, "--launch-skip", "2", "--launch-count", "2",
               "--force-overwrite", *[part for section in SECTIONS for part in ("--section", section)],
               "-o", str(profile), sys.executable, __file__, "--launch", *shape]
    subprocess.run(command, check=True, env=os.environ)
    report_file = f"{profile}.ncu-rep"
    source = args.output / "scan_profile_source.csv"
    with open(source, "w") as file:
        subprocess.run([ncu, "-i", report_file, "--page", "source", "--csv", "--print-source", "sass"], stdout=file,
                       check=True)
    details = subprocess.run([ncu, "-i", report_file, "--page", "details"], capture_output=True, text=True).stdout
    lines = [f"B={args.batch}, S={args.seq_len}, N={args.heads}, K=64, V=16, bf16"]
    for kernel in read_source_csv(source):
        lines += report(kernel)
    wanted = ("Warp Cycles Per Issued Instruction", "Issued Warp Per Scheduler", "No Eligible",
              "Achieved Active Warps Per SM", "Registers Per Thread", "scan_")
    lines += [line.rstrip() for line in details.splitlines() if any(w in line for w in wanted)]
    text = "\n".join(lines)
    print(text)
    (args.output / "profile_scan.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
