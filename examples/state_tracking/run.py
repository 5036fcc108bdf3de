"""State tracking on permutation groups: train at one length, test the running product at longer ones.

Reproduces the length-generalisation experiment of the M2RNN paper (arXiv 2603.14360, Figure 3): each model
reads a random word x_0 ... x_{T-1} of group elements and must output, at every position t, the running
product x_t ∘ ... ∘ x_0 (see groups.py for the convention). Models are trained on words of length up to
--train-length (a linear curriculum of lengths) and scored by per-position accuracy at every
--eval-lengths. Writes results.json (after every model), accuracy.png and RESULTS.md into --output.

    python examples/state_tracking/run.py --preset cpu       # S3, train 32, eval up to 128: minutes on a CPU
    python examples/state_tracking/run.py --preset gpu       # S3 and S5, train 128, eval up to 1024

Every (group, model, seed) is one run. With --jobs N the runs go to N processes side by side (the models are
small: one GPU has room for a dozen of them) and their results are merged into one table.
"""

import argparse
import copy
import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from groups import PermutationGroup  # noqa: E402
from models import MODELS, ModelSize, build_model  # noqa: E402

PRESETS = {
    # two heads of 32×32 states: on the CPU at train length 16 (3,000 steps, lr 2e-2) they fitted 0.66 of the
    # positions where four heads of 16×16 fitted 0.46
    "cpu": dict(groups=["S3"], train_length=32, eval_lengths=[32, 64, 128], steps=1500, batch_size=64,
                eval_batch_size=128, hidden_size=64, num_layers=2, num_heads=2, seeds=[0], jobs=2,
                m2rnn_config={"m2rnn_k_head_dim": 32, "m2rnn_v_head_dim": 32}),
    # about 8 minutes of two H200s: S3 and S5, six M2RNN seeds (the outcome varies from seed to seed) and one of
    # each other model, all 18 runs side by side, each training for 450 s (~15,600 steps at nine runs per GPU).
    # Four heads of 32×32 states: in the H200 sweeps they fitted S3 more reliably than eight heads of 16×16.
    "gpu": dict(groups=["S3", "S5"], train_length=128, eval_lengths=[128, 256, 512, 1024], steps=100_000,
                batch_size=128, eval_batch_size=256, hidden_size=128, num_layers=2, num_heads=4, seeds=[0],
                m2rnn_seeds=[0, 1, 2, 3, 4, 5], max_seconds=450, jobs=18,
                m2rnn_config={"m2rnn_k_head_dim": 32, "m2rnn_v_head_dim": 32}),
}

# Per-model peak learning rates (AdamW, warm-up then cosine decay). M2RNN needs a large one: its transitions
# must saturate the tanh to act as a finite automaton. On S3 at length 128 (H200, eight heads of 16×16) lr 5e-3
# did not fit in 330 s, and lr 2e-2 fitted in 270 s but in none of 8 runs over 450 s. With four heads of 32×32,
# lr 1e-2 fitted in 3 of 4 sweep runs over 450 s and 2e-2 in none of 2 (results/gpu/RESULTS.md). Llama and the
# GRU keep 2e-3 (the GRU solves S3 with it).
LEARNING_RATES = {"m2rnn": 1e-2, "hybrid": 1e-2, "llama": 2e-3, "gru": 2e-3}
EVAL_SEED = 12345   # the same test words for every run
CURVE_EVERY = 100   # training steps between the points of a run's training curve in results.json (a multiple of
                    # 10: the curve takes the points at which the progress bar already scored the batch)


def peak_learning_rate(name: str, args) -> float:
    """--lr if given, else the model's own rate."""
    return args.lr or LEARNING_RATES[name]


def config_overrides(text: str) -> dict:
    overrides = json.loads(text)
    if not isinstance(overrides, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object of M2RNNConfig fields, got {text!r}")
    return overrides


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="cpu", help="defaults for every option below")
    parser.add_argument("--group", dest="groups", nargs="+", help="S3, S5, A5, ... (several: one after another)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--train-length", type=int)
    parser.add_argument("--eval-lengths", type=int, nargs="+")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--eval-batch-size", type=int, help="words scored at every evaluation length")
    parser.add_argument("--hidden-size", type=int)
    parser.add_argument("--num-layers", type=int)
    parser.add_argument("--num-heads", type=int, help="attention heads and M2RNN heads")
    parser.add_argument("--lr", type=float, help=f"peak learning rate of every model (default: {LEARNING_RATES})")
    parser.add_argument("--seeds", type=int, nargs="+", help="a run per seed, for every model")
    parser.add_argument("--m2rnn-seeds", type=int, nargs="+", help="seeds of the pure M2RNN (default: --seeds)")
    parser.add_argument("--weight-decay", type=float, default=0.01, help="AdamW's decoupled weight decay")
    parser.add_argument("--warmup", type=float, default=0.05, help="fraction of training with a linear warm-up")
    parser.add_argument("--curriculum", type=float, default=0.5,
                        help="fraction of training over which the training length grows to --train-length")
    parser.add_argument("--m2rnn-config", type=config_overrides,
                        help='M2RNNConfig fields over the recipe of models.py, as JSON: \'{"m2rnn_v_head_dim": 32}\'')
    parser.add_argument("--max-seconds", type=float,
                        help="train each run for this long (at most --steps steps); the curriculum and the learning "
                             "rate then follow the elapsed time")
    parser.add_argument("--jobs", type=int, help="runs side by side, each in its own process")
    parser.add_argument("--eval-float32", action="store_true", help="evaluate without bf16 autocast on CUDA")
    parser.add_argument("--save-models", action="store_true",
                        help="write each trained model's weights to "
                             "<output>/models/<group>-<model>-seed<s>.safetensors")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", type=Path, default=None, help="default: outputs/state_tracking/<preset>")
    args = parser.parse_args(argv)
    for name, value in PRESETS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.output is None:
        args.output = Path("outputs/state_tracking") / args.preset
    if args.m2rnn_seeds is None:
        args.m2rnn_seeds = args.seeds
    if args.m2rnn_config is None:
        args.m2rnn_config = {}
    return args


def planned_runs(args) -> list[tuple[str, str, int]]:
    """(group, model, seed) of every run, in order."""
    return [(group, name, seed) for group in args.groups for name in args.models
            for seed in (args.m2rnn_seeds if name == "m2rnn" else args.seeds)]


def run_label(name: str, seed: int, args) -> str:
    """The row of a run in the table: the model, and its seed when the model has several."""
    seeds = args.m2rnn_seeds if name == "m2rnn" else args.seeds
    return name if len(seeds) == 1 else f"{name} seed {seed}"


def train_length_at(progress: float, args) -> int:
    """The curriculum: lengths grow linearly from 8 to --train-length (multiples of 8) over its share of training;
    `progress` in [0, 1) is the fraction of training done."""
    ramp = min(1.0, progress / args.curriculum) if args.curriculum > 0 else 1.0
    length = 8 * math.ceil(args.train_length * ramp / 8)
    return max(min(8, args.train_length), min(length, args.train_length))


def learning_rate_at(progress: float, args) -> float:
    """Linear warm-up, then cosine decay to a tenth of --lr."""
    if progress < args.warmup:
        return args.lr * max(progress / args.warmup, 1e-3)
    decay = (progress - args.warmup) / (1 - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * decay)))


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA; the CPU runs in float32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


def train(model, group: PermutationGroup, args, device: torch.device) -> dict:
    """AdamW over --steps steps, or for --max-seconds of wall time (at most --steps steps): then the curriculum and
    the schedule follow the time spent, so they run to the end however many runs share the device."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=args.weight_decay)
    generator = torch.Generator().manual_seed(args.seed)
    model.train()
    start = time.time()
    bar = tqdm(total=args.steps, desc="train", leave=False)
    step, curve = 0, []
    while step < args.steps:
        done = step / args.steps if args.max_seconds is None else (time.time() - start) / args.max_seconds
        if done >= 1:
            break
        for param_group in optimizer.param_groups:
            param_group["lr"] = learning_rate_at(done, args)
        words, products = group.sample(args.batch_size, train_length_at(done, args), generator)
        words, products = words.to(device), products.to(device)
        with autocast(device):
            logits = model(words)
        loss = F.cross_entropy(logits.float().flatten(0, 1), products.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 10 == 0:
            accuracy = (logits.argmax(-1) == products).float().mean().item()
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{accuracy:.3f}", len=words.shape[1])
            if step % CURVE_EVERY == 0:
                curve.append({"step": step, "seconds": round(time.time() - start, 1), "length": words.shape[1],
                              "loss": round(loss.item(), 5), "accuracy": round(accuracy, 4)})
        step += 1
        bar.update()
    bar.close()
    return {"steps": step, "final_train_loss": loss.item(), "train_seconds": time.time() - start, "curve": curve}


@torch.no_grad()
def evaluate(model, group: PermutationGroup, args, device: torch.device) -> dict:
    """Per-position accuracy at every evaluation length: over all positions, and at the last one."""
    model.eval()
    generator = torch.Generator().manual_seed(EVAL_SEED)
    scores = {}
    for length in args.eval_lengths:
        correct = []
        for start in range(0, args.eval_batch_size, args.batch_size):
            words, products = group.sample(min(args.batch_size, args.eval_batch_size - start), length, generator)
            with autocast(device, enabled=not args.eval_float32):
                predictions = model(words.to(device)).argmax(-1).cpu()
            correct.append(predictions == products)
        correct = torch.cat(correct).float()
        scores[length] = {"accuracy": correct.mean().item(), "last_position_accuracy": correct[:, -1].mean().item()}
    return scores


def exact_batch_rate(curve: list[dict], train_length: int) -> float | None:
    """The share of the training curve's batches at the full training length, over the later half of them, with
    every position right: on the H200 the M2RNN seeds that extrapolated were the ones near 1 (0.8 and 1.0 against
    at most 0.11), so it tells from the training length alone which runs found an exact solution."""
    full_length = [point for point in curve if point["length"] == train_length]
    later = full_length[len(full_length) // 2 :]
    return sum(point["accuracy"] == 1.0 for point in later) / len(later) if later else None


def markdown_table(results: dict) -> str:
    lines = []
    train_length = results["settings"]["train_length"]
    for group_name, by_model in results["groups"].items():
        lengths = [str(n) for n in results["settings"]["eval_lengths"]]
        lines += [f"**{group_name}** (train length {train_length}, accuracy over all positions; exact batches: the "
                  f"share of the later half of the logged training batches at length {train_length} with every "
                  f"position right)", "",
                  "| model | " + " | ".join(lengths) + " | exact batches | params | lr | steps | train s |",
                  "|---" * (len(lengths) + 6) + "|"]
        for name, run in by_model.items():
            accuracies = " | ".join(f"{run['eval'][n]['accuracy']:.3f}" for n in lengths)
            exact = exact_batch_rate(run.get("curve", []), train_length)
            lines.append(f"| {name} | {accuracies} | {'–' if exact is None else f'{exact:.2f}'} | {run['params']:,} "
                         f"| {run['lr']:g} | {run['steps']:,} | {run['train_seconds']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = results["groups"]
    figure, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 3.6), squeeze=False)
    for ax, (group_name, by_model) in zip(axes[0], groups.items()):
        lengths = results["settings"]["eval_lengths"]
        for name, run in by_model.items():
            # the baselines dashed, so that M2RNN seeds at the same accuracy still show beneath them
            style = dict(marker="o") if name.startswith("m2rnn") else dict(marker="s", linestyle="--", alpha=0.8)
            ax.plot(lengths, [run["eval"][str(n)]["accuracy"] for n in lengths], label=name, **style)
        ax.axvline(results["settings"]["train_length"], color="gray", linestyle="--", label="train length")
        ax.axhline(1 / PermutationGroup(group_name).order, color="gray", linestyle=":", label="chance")
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("evaluation length")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{group_name} word problem")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_outputs(results: dict, output: Path):
    output.mkdir(parents=True, exist_ok=True)
    (output / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, output / "accuracy.png")
    (output / "RESULTS.md").write_text(
        "# State tracking: accuracy by evaluation length\n\n"
        f"Produced by\n\n```\n{results['command']}\n```\n\n"
        f"on {results['device']}. ![accuracy vs evaluation length](accuracy.png)\n\n"
        + markdown_table(results)
    )


def save_weights(model: nn.Module, path: Path):
    """The model's state dict as safetensors, every tensor copied on its own: safetensors refuses tensors that share
    memory, and on CUDA the GRU's weights are views of one cuDNN buffer (the tied embeddings are then stored twice)."""
    safetensors.torch.save_file({name: t.detach().clone() for name, t in model.state_dict().items()}, str(path))


def run_one(group_name: str, name: str, seed: int, args, size: ModelSize, device: torch.device) -> dict:
    """Train one model from its seed, then score it at every evaluation length."""
    group = PermutationGroup(group_name)
    args = copy.copy(args)
    args.seed, args.lr = seed, peak_learning_rate(name, args)
    torch.manual_seed(seed)
    model = build_model(name, group.order, size, args.m2rnn_config).to(device)
    label = f"{group.name} {run_label(name, seed, args)}"
    print(f"{label}: {sum(p.numel() for p in model.parameters()):,} parameters, lr {args.lr:g}", flush=True)
    run = {"seed": seed, "lr": args.lr, **train(model, group, args, device)}
    if args.save_models:
        path = args.output / "models" / f"{group.name}-{name}-seed{seed}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_weights(model, path)
    start = time.time()
    run["eval"] = {str(n): s for n, s in evaluate(model, group, args, device).items()}
    run["eval_seconds"] = time.time() - start
    run["params"] = sum(p.numel() for p in model.parameters())
    accuracies = "  ".join(f"{n}: {s['accuracy']:.3f}" for n, s in run["eval"].items())
    print(f"{label}: trained {run['steps']} steps in {run['train_seconds']:.0f} s "
          f"(loss {run['final_train_loss']:.3f}), "
          f"evaluated in {run['eval_seconds']:.0f} s; {accuracies}", flush=True)
    return run


def visible_gpus(device: str) -> list[str | None]:
    """The GPUs that runs on `device` are spread over: every visible one for plain "cuda", else [None] (no choice)."""
    if device != "cuda":
        return [None]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]


def run_in_processes(args, argv: list[str]) -> dict[tuple[str, str, int], dict]:
    """Every run in its own process, --jobs at a time, each writing into <output>/runs/<group>-<model>-seed<s>.
    On several GPUs each new run goes to the one with the fewest runs going."""
    pending = planned_runs(args)
    running, finished = {}, {}
    gpus = visible_gpus(args.device)
    try:
        while pending or running:
            while pending and len(running) < args.jobs:
                gpu = min(gpus, key=lambda g: sum(run_gpu == g for *_, run_gpu in running.values()))
                env = None if gpu is None else {**os.environ, "CUDA_VISIBLE_DEVICES": gpu}
                key = pending.pop(0)
                group_name, name, seed = key
                output = args.output / "runs" / f"{group_name}-{name}-seed{seed}"
                output.mkdir(parents=True, exist_ok=True)
                command = [sys.executable, __file__, *argv, "--group", group_name, "--models", name, "--seeds",
                           str(seed), "--m2rnn-seeds", str(seed), "--jobs", "1", "--output", str(output)]
                log = open(output / "log.txt", "w")
                process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
                running[key] = (process, output, log, gpu)
            time.sleep(1)
            for key, (process, output, log, _) in list(running.items()):
                if process.poll() is None:
                    continue
                log.close()
                del running[key]
                text = (output / "log.txt").read_text()
                if process.returncode != 0:
                    raise RuntimeError(f"run {key} failed (exit {process.returncode}); the end of its output "
                                       f"({output}/log.txt):\n{text[-3000:]}")
                finished[key] = next(iter(json.loads((output / "results.json").read_text())["groups"][key[0]].values()))
                print(next(line for line in reversed(text.splitlines()) if ": trained " in line), flush=True)
    finally:
        for process, _, log, _ in running.values():   # a failed or interrupted study stops the runs still going
            process.kill()
            log.close()
    return finished


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)   # the models are tiny: more threads only add synchronisation (and stall under load)
    size = ModelSize(hidden_size=args.hidden_size, num_layers=args.num_layers, num_heads=args.num_heads,
                     max_length=max(args.eval_lengths + [args.train_length]))
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    results = {
        "command": shlex.join(["python", "examples/state_tracking/run.py", *argv]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "settings": {**settings, "learning_rates": {m: peak_learning_rate(m, args) for m in args.models},
                     "model_size": asdict(size)},
        "groups": {},
    }
    runs = planned_runs(args)
    if args.jobs > 1 and len(runs) > 1:
        finished = run_in_processes(args, argv)
    else:
        finished = {}
    for key in runs:
        group_name, name, seed = key
        if key not in finished:
            finished[key] = run_one(group_name, name, seed, args, size, device)
        results["groups"].setdefault(group_name, {})[run_label(name, seed, args)] = finished[key]
        write_outputs(results, args.output)
    print("\n" + markdown_table(results))
    print(f"wrote {args.output}/results.json, accuracy.png, RESULTS.md")
    return results


if __name__ == "__main__":
    main()
