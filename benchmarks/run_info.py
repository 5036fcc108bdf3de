"""What a benchmark's figures were measured on, recorded in every JSON the benchmarks write: the date, the GPU, the
software versions and the commit (`benchmarks/RESULTS.md` cites them)."""

import datetime
import importlib.metadata
import os
import subprocess
from pathlib import Path

import torch
import transformers
import triton

from modeling_m2rnn.kernels.m2rnn_scan.fast_path import gluon_kernels

REPO = Path(__file__).resolve().parents[1]


def git_commit() -> str | None:
    """HEAD's hash of the checkout these scripts are in, "-dirty" appended where its files differ from HEAD; None
    where they are no git checkout of their own (a copy of the tree inside another repository records nothing
    rather than that repository's commit)."""
    def git(*args):
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)

    toplevel = git("rev-parse", "--show-toplevel")
    if toplevel.returncode != 0 or Path(toplevel.stdout.strip()).resolve() != REPO:
        return None
    commit = git("rev-parse", "--verify", "HEAD").stdout.strip() or None
    return commit and commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no").stdout else "")


def installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def write_results(name: str, text: str, repository: bool = True) -> list[Path]:
    """Writes a benchmark's raw file `name` to benchmarks/results/ (what RESULTS.md cites; skipped when not
    `repository`) and, when the environment names one, to $OUT (the folder a GPU call sends back). Returns the paths."""
    folders = [REPO / "benchmarks" / "results"] if repository else []
    folders += [Path(os.environ["OUT"])] if os.environ.get("OUT") else []
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return [folder / name for folder in folders]


def run_info() -> dict:
    return dict(
        date=datetime.date.today().isoformat(),
        gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        torch=torch.__version__,
        triton=triton.__version__,
        transformers=transformers.__version__,
        fla_core=installed_version("fla-core"),
        # which forward and backward the 16-bit scan runs, Gluon or Triton (kernels/m2rnn_scan/fast_path.py)
        scan_kernels=gluon_kernels(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
        commit=git_commit(),
    )
