"""examples/finetune.py trains the same on one GPU, under DDP on two GPUs and under FSDP2 on two GPUs.

    python benchmarks/check_multi_gpu.py --bf16                 # on a machine with 2 GPUs
    python benchmarks/check_multi_gpu.py --cpu --max-steps 6 --batch-size 2 --seq-len 32   # gloo, no GPU

Writes a seeded synthetic corpus, then runs the example three times on it with the same seed and the same
global batch of 2·B blocks: one process with --batch-size 2B (on the first visible GPU only: a lone process
that sees two GPUs would run nn.DataParallel over both and double the batch), then
`torchrun --standalone --nproc_per_node 2 examples/finetune.py --batch-size B`, then the same with --fsdp.
Prints the training loss at every logging step and every eval loss of the three runs, the largest relative
difference of each 2-process run from the single one, and exits non-zero if one is over --rtol. The table and a
JSON go to --output-dir, each run's output to <run>.log there.

Why the runs see the same data (transformers 5.17, accelerate 1.15): the Trainer's RandomSampler becomes
accelerate's SeedableRandomSampler, seeded the same (the training seed) in every process, and under 2
processes accelerate's BatchSamplerShard hands process i batches i, i+2, ... of size B of that permutation,
so each step of the pair covers exactly the 2B blocks of the single run's step. That holds as long as
training stays inside one epoch (a short last batch would be split differently), so the corpus is made
large enough. Without --packing every block has --seq-len tokens, so the mean of the two per-process losses
is the loss over the global batch. The eval set is a whole number of global batches (--eval-fraction is
chosen for it): the Trainer weights each eval batch's loss by the batch size, and under 2 processes
accelerate pads a short last batch with blocks from the start.

--cpu runs everything on the CPU, the 2-process runs on gloo (ACCELERATE_USE_CPU=true, which is what
`accelerate launch --cpu` sets; without it the Trainer does not join torchrun's process group and each
process trains alone). FSDP2 is skipped there: accelerate 1.15 enables FSDP only for GPU-type distributed
runs and would train with DDP on CPU processes, which finetune.py refuses.
"""

import argparse
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FINETUNE = REPO / "examples" / "finetune.py"

# Tolerances on the relative difference of each loss from the single-process run. bf16 keeps 8 bits of
# mantissa (a rounding of ~4e-3 per op), and a per-device batch of B instead of 2B changes matmul shapes and
# reduction orders, so the two launches round differently from the first step on, and 40 optimizer steps
# carry those differences forward; a loss is a mean over thousands of tokens, which averages them down.
# Under FSDP2 accelerate also casts the parameters to bf16 for compute and reduces gradients in bf16.
# 2e-2 leaves room for that and still catches other data: on the CPU, a run with batch B instead of 2B was
# 2-9% off by steps 4-6. (A gradient off by a constant factor would not show: AdamW and clipping undo it.)
# In float32 the launches agree to rounding (seen on the CPU: ≤ 2e-7).
RTOL_BF16 = 2e-2
RTOL_FP32 = 1e-3

WORDS = {
    "adjective": "small quick silent old bright heavy narrow warm plain hidden".split(),
    "noun": "matrix state token layer gate head model kernel vector river engine signal".split(),
    "verb": "updates reads folds carries forgets tracks mixes scans keeps sends".split(),
    "adverb": "slowly again twice early always quietly".split(),
}


def sentence(rng: random.Random) -> str:
    """"The quick matrix updates the warm signal slowly." — a little grammar, so the loss has something to learn."""
    words = ["the", rng.choice(WORDS["adjective"]), rng.choice(WORDS["noun"]), rng.choice(WORDS["verb"]),
             "the", rng.choice(WORDS["adjective"]), rng.choice(WORDS["noun"])]
    if rng.random() < 0.5:
        words.append(rng.choice(WORDS["adverb"]))
    text = " ".join(words)
    return text[0].upper() + text[1:] + "."


def write_corpus(path: Path, min_tokens: int, min_lines: int, seed: int) -> int:
    """One document of 1-3 sentences a line; the byte-level tokenizer makes each byte (and each line end) a token."""
    rng = random.Random(seed)
    lines, tokens = [], 0
    while tokens < min_tokens or len(lines) < min_lines:
        line = " ".join(sentence(rng) for _ in range(rng.randint(1, 3)))
        lines.append(line)
        tokens += len(line) + 1   # + <eos>
    path.write_text("\n".join(lines) + "\n")
    return len(lines)


def count_blocks(corpus: Path, seq_len: int) -> int:
    """The number of training blocks finetune.py cuts from the corpus, by its own code."""
    sys.path.insert(0, str(FINETUNE.parent))
    import finetune

    documents = finetune.load_documents(corpus, "text")
    return len(finetune.tokenize(documents, "text", finetune.byte_level_tokenizer(), seq_len, packing=False))


def eval_split(num_blocks: int, global_batch: int, seed: int) -> tuple[float, int]:
    """An --eval-fraction that puts a whole number of global batches (about a tenth, at most 16) in the eval set."""
    eval_blocks = global_batch * min(16, max(1, num_blocks // 10 // global_batch))
    # datasets takes ceil(fraction * num_blocks) blocks; half a block under the count survives float rounding
    fraction = (eval_blocks - 0.5) / num_blocks
    from datasets import Dataset

    test = Dataset.from_dict({"i": list(range(num_blocks))}).train_test_split(test_size=fraction, seed=seed)["test"]
    assert len(test) == eval_blocks, (len(test), eval_blocks)
    return fraction, eval_blocks


def run(name: str, command: list[str], env: dict, output_dir: Path, timeout: float) -> dict:
    """One launch, its output to <name>.log. A launch still running after `timeout` seconds is killed with every
    process it started (torchrun's workers are in its session), so a launch that hangs fails instead."""
    log = output_dir / f"{name}.log"
    print(f"[{name}] {' '.join(command)}   (output in {log})", flush=True)
    with log.open("w") as f, subprocess.Popen(command, env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                              start_new_session=True) as launch:
        try:
            status = launch.wait(timeout)
            problem = f"failed with exit status {status}" if status else None
        except subprocess.TimeoutExpired:
            os.killpg(launch.pid, signal.SIGKILL)
            launch.wait()
            problem = f"was still running after {timeout:.0f} s and was killed"
    if problem:
        print(f"[{name}] {problem}; the end of {log}:")
        print("".join(log.read_text().splitlines(keepends=True)[-30:]))
        sys.exit(2)
    return json.loads((output_dir / name / "trainer_state.json").read_text())


def losses(state: dict) -> dict[str, list[tuple[int, float]]]:
    """(step, value) of every logged training loss, grad norm and eval loss, in order."""
    history = state["log_history"]
    return {key: [(entry["step"], entry[key]) for entry in history if key in entry]
            for key in ("loss", "grad_norm", "eval_loss")}


def relative_differences(run: list, reference: list) -> list[float]:
    if [step for step, _ in run] != [step for step, _ in reference]:
        raise SystemExit(f"the runs logged at different steps: {[s for s, _ in run]} vs {[s for s, _ in reference]}")
    return [abs(value - ref) / abs(ref) for (_, value), (_, ref) in zip(run, reference)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8, help="per device in the 2-process runs (B)")
    parser.add_argument("--preset", help="a finetune.py --preset (default: its small hybrid)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast in all three runs")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU, 2 processes on gloo; no FSDP2")
    parser.add_argument("--rtol", type=float, help=f"default {RTOL_BF16} with --bf16, else {RTOL_FP32}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds one launch may take (default 3600)")
    parser.add_argument("--output-dir", type=Path, default=REPO / "outputs" / "check_multi_gpu")
    args = parser.parse_args()
    rtol = args.rtol if args.rtol is not None else (RTOL_BF16 if args.bf16 else RTOL_FP32)
    if args.cpu and args.bf16:
        parser.error("--bf16 is for GPUs (TrainingArguments refuses bf16 without a bf16 GPU unless use_cpu is set)")

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    if args.cpu:
        env.update(CUDA_VISIBLE_DEVICES="", ACCELERATE_USE_CPU="true")
        if sys.platform == "linux":
            # gloo otherwise binds to the address the host name resolves to; both processes run on this
            # machine, and loopback is the one address sure to join them
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        single_env = env
    else:
        import torch

        if torch.cuda.device_count() < 2:
            raise SystemExit(f"{torch.cuda.device_count()} GPU(s) visible; this check needs 2 (or --cpu)")
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        single_env = dict(env, CUDA_VISIBLE_DEVICES=visible.split(",")[0] if visible else "0")

    args.output_dir.mkdir(parents=True, exist_ok=True)
    corpus = args.output_dir / "corpus.txt"
    global_batch = 2 * args.batch_size
    # one epoch must hold every training step, with room for the eval tenth; 3000 lines at least
    min_tokens = int(args.max_steps * global_batch * args.seq_len * 1.3) + 32 * global_batch * args.seq_len
    num_lines = write_corpus(corpus, min_tokens, min_lines=3000, seed=args.seed)
    num_blocks = count_blocks(corpus, args.seq_len)
    eval_fraction, eval_blocks = eval_split(num_blocks, global_batch, args.seed)
    train_blocks = num_blocks - eval_blocks
    assert args.max_steps * global_batch <= train_blocks, "the corpus is too small for one epoch"
    print(f"corpus: {num_lines} lines, {num_blocks} blocks of {args.seq_len} tokens; {eval_blocks} for eval, "
          f"{args.max_steps} steps x {global_batch} of the {train_blocks} for training")

    common = ["--data", str(corpus), "--max-steps", str(args.max_steps), "--seq-len", str(args.seq_len),
              "--eval-fraction", repr(eval_fraction), "--seed", str(args.seed)]
    if args.preset:
        common += ["--preset", args.preset]
    if args.bf16:
        common += ["--bf16"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    runs = {
        "single": [sys.executable, str(FINETUNE), "--batch-size", str(global_batch)],
        "ddp": [*torchrun, str(FINETUNE), "--batch-size", str(args.batch_size)],
        "fsdp2": [*torchrun, str(FINETUNE), "--batch-size", str(args.batch_size), "--fsdp"],
    }
    if args.cpu:
        del runs["fsdp2"]
        print("fsdp2: skipped with --cpu (accelerate enables FSDP only for runs on GPUs; on CPU processes it "
              "would train with DDP, and finetune.py --fsdp stops there)")
    results = {}
    for name, command in runs.items():
        command = [*command, *common, "--output-dir", str(args.output_dir / name)]
        results[name] = losses(run(name, command, single_env if name == "single" else env, args.output_dir,
                                    args.timeout))

    others = [name for name in runs if name != "single"]
    report = {"settings": {**vars(args), "output_dir": str(args.output_dir), "rtol": rtol,
                           "eval_fraction": eval_fraction, "eval_blocks": eval_blocks, "train_blocks": train_blocks},
              "runs": results, "max_relative_difference": {}}
    lines = [f"{'':6}{'step':>6}" + "".join(f"{name:>12}" for name in runs)
             + "".join(f"{name + ' rel':>12}" for name in others)]
    failed = []
    for key, label in (("loss", "train"), ("eval_loss", "eval")):
        differences = {name: relative_differences(results[name][key], results["single"][key]) for name in others}
        for i, (step, _) in enumerate(results["single"][key]):
            lines.append(f"{label:6}{step:>6}" + "".join(f"{results[name][key][i][1]:>12.6f}" for name in runs)
                         + "".join(f"{differences[name][i]:>12.2e}" for name in others))
        for name in others:
            worst = max(differences[name])
            report["max_relative_difference"][f"{name} {key}"] = worst
            if worst > rtol:
                failed.append(f"{name} {key} {worst:.2e}")
    for name in others:   # not checked: a norm of small gradients differs more than the loss, but worth seeing
        report["max_relative_difference"][f"{name} grad_norm"] = max(
            relative_differences(results[name]["grad_norm"], results["single"]["grad_norm"]))
    lines.append("")
    lines += [f"max relative difference from single, {key}: {value:.2e}"
              for key, value in report["max_relative_difference"].items()]
    lines.append(f"FAILED (rtol {rtol:.0e}): " + ", ".join(failed) if failed else f"all losses within rtol {rtol:.0e}")
    report["passed"] = not failed
    table = "\n".join(lines)
    print(table)
    (args.output_dir / "check_multi_gpu.txt").write_text(table + "\n")
    (args.output_dir / "check_multi_gpu.json").write_text(json.dumps(report, indent=2) + "\n")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
