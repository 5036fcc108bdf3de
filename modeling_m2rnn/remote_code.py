"""Write the package's code beside a checkpoint, so that `trust_remote_code=True` loads it without the package.

transformers' dynamic modules resolve `from .name import ...` to a file `name.py` next to the entry file, so
sub-packages cannot travel as they are. Each module is written as one flat file named after its path
(`kernels/m2rnn_scan/naive.py` → `kernels_m2rnn_scan_naive.py`, `kernels/__init__.py` → `kernels.py`), and its relative
imports are rewritten to those names.
"""

import json
import re
from pathlib import Path

PACKAGE_ROOT = Path(__file__).parent
_RELATIVE_IMPORT = re.compile(r"^(\s*)from\s+(\.+)([\w.]*)\s+import\s", flags=re.MULTILINE)

AUTO_MAP = {
    "AutoConfig": "configuration_configuration_m2rnn.M2RNNConfig",
    "AutoModel": "models_modeling_m2rnn.M2RNNModel",
    "AutoModelForCausalLM": "models_modeling_m2rnn.M2RNNForCausalLM",
    "AutoModelForSequenceClassification": "models_modeling_m2rnn.M2RNNForSequenceClassification",
}


def _package_of(path: Path) -> list[str]:
    """The sub-package a module file belongs to, as path parts below the package root."""
    return list(path.relative_to(PACKAGE_ROOT).parent.parts)


def flat_module_name(parts: list[str]) -> str:
    if not parts:
        raise ValueError("the package root itself has no flat module; import from a sub-module instead")
    return "_".join(parts)


def _flat_name_of_file(path: Path) -> str:
    parts = _package_of(path) + ([] if path.stem == "__init__" else [path.stem])
    return flat_module_name(parts)


def _rewrite_imports(source: str, package: list[str]) -> str:
    def rewrite(match: re.Match) -> str:
        indent, dots, dotted = match.group(1), match.group(2), match.group(3)
        levels_up = len(dots) - 1
        if levels_up > len(package):
            raise ValueError(f"relative import {dots}{dotted} leaves the package")
        target = package[: len(package) - levels_up] + (dotted.split(".") if dotted else [])
        return f"{indent}from .{flat_module_name(target)} import "

    return _RELATIVE_IMPORT.sub(rewrite, source)


def export_remote_code(directory) -> list[Path]:
    """Write every module of the package into `directory` as flat files and add `auto_map` to its config.json."""
    directory = Path(directory)
    written = []
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        if path.parent == PACKAGE_ROOT and path.stem == "__init__":
            continue   # the registration entry point: remote code is found through auto_map instead
        target = directory / f"{_flat_name_of_file(path)}.py"
        target.write_text(_rewrite_imports(path.read_text(encoding="utf-8"), _package_of(path)), encoding="utf-8")
        written.append(target)

    config_file = directory / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["auto_map"] = AUTO_MAP
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return written
