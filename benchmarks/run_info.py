"""What a benchmark's figures were measured on, recorded in every JSON the benchmarks write: the date, the GPU, the
software versions and the commit (`benchmarks/RESULTS.md` cites them)."""

import datetime
import importlib.metadata
import subprocess

import torch
import transformers
import triton


def git_commit() -> str | None:
    """HEAD's hash, or None where the tree is no git checkout with commits."""
    result = subprocess.run(["git", "rev-parse", "--verify", "HEAD"], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else None


def installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def run_info() -> dict:
    return dict(
        date=datetime.date.today().isoformat(),
        gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        torch=torch.__version__,
        triton=triton.__version__,
        transformers=transformers.__version__,
        fla_core=installed_version("fla-core"),
        commit=git_commit(),
    )
