"""Scan kernel variants side by side in one GPU call: trees of the package (another commit, a working copy) and
launch settings, each checked against float64 first, then timed in alternating rounds.

    mkdir /tmp/base && git archive HEAD~1 modeling_m2rnn | tar -x -C /tmp/base     # a tree to compare with
    PYTHONPATH=. python benchmarks/compare_scan_variants.py base=/tmp/base main=. \\
        "main-64-rows=.:backward_rows=64,gluon_backward_max_registers=255" --rounds 2

A variant is NAME=ROOT[:FIELD=VALUE,...]: the folder whose `modeling_m2rnn` package runs (the repository root or a
copy of that folder) and KernelConfig fields changed for it; M2RNN_SCAN_KERNELS applies to every variant as set.
Each variant runs in a process of its own (two trees of one package cannot share a process), with this checkout's
check and timing code (check_scan_gpu.check_correctness, bench_scan.measure_shape) on the variant's package: in the
first round the float64 check (its errors go in the log), whose failure drops the variant before any timing; in every
round the inference forward and the forward+backward at bench_scan's shapes (`--shapes` names fewer). Figures of one
call compare; the rounds show the spread. The log (the check's lines, one JSON line per variant and round, then a
table of the medians) goes to benchmarks/results/compare_scan_variants.log and to $OUT when set.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROUND_TIMEOUT_S = 600


def parse_variant(text: str) -> dict:
    """NAME=ROOT[:FIELD=VALUE,...] → {"name", "root", "config": ["FIELD=VALUE", ...]}."""
    name, equals, rest = text.partition("=")
    root, _, config = rest.partition(":")
    if not equals or not name or not root:
        raise ValueError(f"variant {text!r}: expected NAME=ROOT[:FIELD=VALUE,...]")
    if not (Path(root) / "modeling_m2rnn").is_dir():
        raise ValueError(f"variant {text!r}: {root} holds no modeling_m2rnn package")
    return dict(name=name, root=str(Path(root).resolve()), config=[f for f in config.split(",") if f])


def summary(rounds: dict[str, list[dict]]) -> str:
    """The median fwd and fwd+bwd ms of each variant's rounds ({shape: {"fwd_ms", "fwdbwd_ms"}} a round) per shape,
    the fwd+bwd change against the first variant beside them."""
    medians = {name: {shape: {key: statistics.median(r[shape][key] for r in figures) for key in ("fwd_ms", "fwdbwd_ms")}
                      for shape in figures[0]}
               for name, figures in rounds.items()}
    first = next(iter(medians.values()))
    lines = [f"{'variant':<20}{'shape':<16}{'fwd ms':>9}{'fwd+bwd ms':>12}{'vs first':>10}"]
    for name, shapes in medians.items():
        for shape, m in shapes.items():
            change = m["fwdbwd_ms"] / first[shape]["fwdbwd_ms"] - 1
            lines.append(f"{name:<20}{shape:<16}{m['fwd_ms']:>9.3f}{m['fwdbwd_ms']:>12.3f}{change:>+10.1%}")
    return "\n".join(lines)


def run_variant(variant: dict, check: bool, shapes: list[str], log) -> dict | None:
    """One round of a variant in a process of its own, at `shapes` (names of bench_scan.SHAPES); its figures, or None
    where its check or its run failed. The check's lines (the errors against float64) go to `log`."""
    command = [sys.executable, __file__, "--one", *(["--check"] if check else []), "--shapes", *shapes, "--",
               *variant["config"]]
    environment = dict(os.environ, PYTHONPATH=variant["root"])
    try:
        done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=ROUND_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        print(f"{variant['name']}: no result within {ROUND_TIMEOUT_S} s", file=sys.stderr)
        return None
    lines = done.stdout.strip().splitlines()
    figures = lines.pop() if done.returncode == 0 else None  # the last line, a JSON object
    for line in lines:
        log(f"{variant['name']} check: {line}")
    if figures is None:
        print(done.stderr[-4000:], file=sys.stderr)
        return None
    return json.loads(figures)


def one(check: bool, config: list[str], shapes: list[str]):
    """The child process: the variant's package under this checkout's benchmarks."""
    import bench_scan
    import torch
    from check_scan_gpu import check_correctness

    from modeling_m2rnn.kernels.m2rnn_scan import triton_scan

    triton_scan.CONFIG = bench_scan.config_with(config)
    if check:
        report = check_correctness(lambda line: print(line, flush=True))
        if not all(case["passed"] for case in report.values()):
            raise SystemExit("check failed")
    torch.manual_seed(0)
    figures = {}
    for shape in shapes:
        B, N, S = bench_scan.SHAPES[shape]
        measured = bench_scan.measure_shape(B, N, S, timings_only=True)
        figures[shape] = {key: round(measured[key], 4) for key in ("fwd_ms", "fwdbwd_ms")}
    print(json.dumps(figures))


def arguments() -> argparse.ArgumentParser:
    from bench_scan import SHAPES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="*", help="NAME=ROOT[:FIELD=VALUE,...]")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES),
                        help="bench_scan's shapes to time (default: all); fewer fit more variants in one GPU call")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child process: FIELD=VALUE ...
    parser.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    return parser


def main():
    parser = arguments()
    args = parser.parse_args()
    if args.one:
        return one(args.check, args.variants, args.shapes)
    variants = [parse_variant(text) for text in args.variants]
    if len({v["name"] for v in variants}) != len(variants) or not variants:
        parser.error("expected one or more variants with distinct names")

    from run_info import run_info, write_results

    lines = [json.dumps(run_info())]

    def log(line):
        print(line, flush=True)
        lines.append(line)

    rounds = {v["name"]: [] for v in variants}
    for round_index in range(args.rounds):
        for variant in variants:
            if round_index > 0 and not rounds[variant["name"]]:
                continue  # failed in the first round, its check included
            figures = run_variant(variant, round_index == 0, args.shapes, log)
            log(f"{variant['name']} round {round_index}: " + (json.dumps(figures) if figures else "FAILED (above)"))
            if figures:
                rounds[variant["name"]].append(figures)
    timed = {name: figures for name, figures in rounds.items() if figures}
    log(summary(timed) if timed else "no variant was timed")
    write_results("compare_scan_variants.log", "\n".join(lines) + "\n")
    if len(timed) < len(variants):
        raise SystemExit("a variant failed (see above)")


if __name__ == "__main__":
    main()
