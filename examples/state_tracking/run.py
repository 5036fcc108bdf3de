"""State tracking on permutation groups: train at one length, test the running product at longer ones.

Reproduces the length-generalisation experiment of the M2RNN paper (arXiv 2603.14360, Figure 3): each model
reads a random word x_0 ... x_{T-1} of group elements and must output, at every position t, the running
product x_t ∘ ... ∘ x_0 (see groups.py for the convention). Models are trained on words of length up to
--train-length (a linear curriculum of lengths) and scored by per-position accuracy at every
--eval-lengths. Writes results.json (after every model), accuracy.png and RESULTS.md into --output.

    python examples/state_tracking/run.py --preset cpu       # S3, train 32, eval up to 128: minutes on a CPU
    python examples/state_tracking/run.py --preset gpu       # S3 and S5, train 128, eval up to 1024
"""

import argparse
import json
import math
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from groups import PermutationGroup  # noqa: E402
from models import MODELS, ModelSize, build_model  # noqa: E402

PRESETS = {
    "cpu": dict(groups=["S3"], train_length=32, eval_lengths=[32, 64, 128], steps=1500, batch_size=64,
                eval_batch_size=128, hidden_size=64, num_layers=2, num_heads=4),
    # sized for about 6 minutes of one H200 for S3 and S5 with all four models: each model trains for at most
    # --max-seconds (the step count is the cap when steps are fast: Triton M2RNN about 10 ms/step at length 128)
    "gpu": dict(groups=["S3", "S5"], train_length=128, eval_lengths=[128, 256, 512, 1024], steps=2000,
                batch_size=128, eval_batch_size=256, hidden_size=128, num_layers=2, num_heads=8, max_seconds=35),
}


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
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=float, default=0.05, help="fraction of the steps with a linear warm-up")
    parser.add_argument("--curriculum", type=float, default=0.5,
                        help="fraction of the steps over which the training length grows to --train-length")
    parser.add_argument("--max-seconds", type=float, help="stop a model's training after this long")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None, help="default: outputs/state_tracking/<preset>")
    args = parser.parse_args(argv)
    for name, value in PRESETS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.output is None:
        args.output = Path("outputs/state_tracking") / args.preset
    return args


def train_length_at(step: int, args) -> int:
    """The curriculum: lengths grow linearly from 8 to --train-length (multiples of 8) over its steps."""
    ramp = max(1, round(args.curriculum * args.steps))
    length = 8 * math.ceil(args.train_length * min(1.0, (step + 1) / ramp) / 8)
    return max(min(8, args.train_length), min(length, args.train_length))


def learning_rate_at(step: int, args) -> float:
    """Linear warm-up, then cosine decay to a tenth of --lr."""
    warmup = max(1, round(args.warmup * args.steps))
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, args.steps - warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def train(model, group: PermutationGroup, args, device: torch.device) -> dict:
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    generator = torch.Generator().manual_seed(args.seed)
    model.train()
    start = time.time()
    progress = tqdm(range(args.steps), desc="train", leave=False)
    for step in progress:
        for param_group in optimizer.param_groups:
            param_group["lr"] = learning_rate_at(step, args)
        words, products = group.sample(args.batch_size, train_length_at(step, args), generator)
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
            progress.set_postfix(loss=f"{loss.item():.3f}", acc=f"{accuracy:.3f}", len=words.shape[1])
        if args.max_seconds is not None and time.time() - start > args.max_seconds:
            break
    return {"steps": step + 1, "final_train_loss": loss.item(), "train_seconds": time.time() - start}


@torch.no_grad()
def evaluate(model, group: PermutationGroup, args, device: torch.device) -> dict:
    """Per-position accuracy at every evaluation length: over all positions, and at the last one."""
    model.eval()
    generator = torch.Generator().manual_seed(args.seed + 1)
    scores = {}
    for length in args.eval_lengths:
        correct = []
        for start in range(0, args.eval_batch_size, args.batch_size):
            words, products = group.sample(min(args.batch_size, args.eval_batch_size - start), length, generator)
            with autocast(device):
                predictions = model(words.to(device)).argmax(-1).cpu()
            correct.append(predictions == products)
        correct = torch.cat(correct).float()
        scores[length] = {"accuracy": correct.mean().item(), "last_position_accuracy": correct[:, -1].mean().item()}
    return scores


def markdown_table(results: dict) -> str:
    lines = []
    for group_name, by_model in results["groups"].items():
        lengths = [str(n) for n in results["settings"]["eval_lengths"]]
        lines += [f"**{group_name}** (train length {results['settings']['train_length']}, "
                  f"accuracy over all positions)", "",
                  "| model | " + " | ".join(lengths) + " | params | train s |",
                  "|---" * (len(lengths) + 3) + "|"]
        for name, run in by_model.items():
            accuracies = " | ".join(f"{run['eval'][n]['accuracy']:.3f}" for n in lengths)
            lines.append(f"| {name} | {accuracies} | {run['params']:,} | {run['train_seconds']:.0f} |")
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
            ax.plot(lengths, [run["eval"][str(n)]["accuracy"] for n in lengths], marker="o", label=name)
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


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)   # the models are tiny: more threads only add synchronisation (and stall under load)
    size = ModelSize(hidden_size=args.hidden_size, num_layers=args.num_layers, num_heads=args.num_heads,
                     max_length=max(args.eval_lengths + [args.train_length]))
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    results = {
        "command": shlex.join(["python", *sys.argv]) if argv is None else shlex.join(["python", "run.py", *argv]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "settings": {**settings, "model_size": asdict(size)},
        "groups": {},
    }
    for group_name in args.groups:
        group = PermutationGroup(group_name)
        results["groups"][group.name] = {}
        for name in args.models:
            torch.manual_seed(args.seed)
            model = build_model(name, group.order, size).to(device)
            print(f"{group.name} {name}: {sum(p.numel() for p in model.parameters()):,} parameters")
            run = train(model, group, args, device)
            start = time.time()
            run["eval"] = {str(n): s for n, s in evaluate(model, group, args, device).items()}
            run["eval_seconds"] = time.time() - start
            run["params"] = sum(p.numel() for p in model.parameters())
            results["groups"][group.name][name] = run
            accuracies = "  ".join(f"{n}: {s['accuracy']:.3f}" for n, s in run["eval"].items())
            print(f"{group.name} {name}: trained {run['steps']} steps in {run['train_seconds']:.0f} s "
                  f"(loss {run['final_train_loss']:.3f}), evaluated in {run['eval_seconds']:.0f} s; {accuracies}")
            write_outputs(results, args.output)
    print("\n" + markdown_table(results))
    print(f"wrote {args.output}/results.json, accuracy.png, RESULTS.md")
    return results


if __name__ == "__main__":
    main()
