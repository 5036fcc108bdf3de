"""Write the package's code beside a checkpoint, so that `trust_remote_code=True` loads it without the package.

transformers' dynamic modules resolve `from .name import ...` to a file `name.py` next to the entry file, so
sub-packages cannot travel as they are. Each module is written as one flat file, and its relative imports are
rewritten to those names. The names follow transformers' remote-code convention, so that none can be a user's file:
the module of the config class is `configuration_m2rnn.py`, that of the model classes `modeling_m2rnn.py`, and every
other module `modeling_m2rnn_<path>.py` (`kernels/m2rnn_scan/naive.py` → `modeling_m2rnn_kernels_m2rnn_scan_naive.py`,
`kernels/__init__.py` → `modeling_m2rnn_kernels.py`).

Every written file starts with `MARKER`; a file of one of these names without it is not overwritten.
"""

import inspect
import json
import re
from pathlib import Path

PACKAGE_ROOT = Path(__file__).parent
MARKER = "# Written by modeling_m2rnn's save_pretrained (the model's code for trust_remote_code); rewritten on save."
CONFIG_ENTRY = "configuration_m2rnn"
MODELING_ENTRY = "modeling_m2rnn"
_RELATIVE_IMPORT = re.compile(r"^(\s*)from\s+(\.+)([\w.]*)\s+import\s", flags=re.MULTILINE)

AUTO_MAP = {
    "AutoConfig": f"{CONFIG_ENTRY}.M2RNNConfig",
    "AutoModel": f"{MODELING_ENTRY}.M2RNNModel",
    "AutoModelForCausalLM": f"{MODELING_ENTRY}.M2RNNForCausalLM",
    "AutoModelForSequenceClassification": f"{MODELING_ENTRY}.M2RNNForSequenceClassification",
}


def _package_of(path: Path) -> list[str]:
    """The sub-package a module file belongs to, as path parts below the package root."""
    return list(path.relative_to(PACKAGE_ROOT).parent.parts)


def _is_flat_name(stem: str) -> bool:
    return stem in (CONFIG_ENTRY, MODELING_ENTRY) or stem.startswith(f"{MODELING_ENTRY}_")


def _module_files() -> list[Path]:
    """Every module of the package, but the registration entry point (remote code is found through auto_map)."""
    return [
        path for path in sorted(PACKAGE_ROOT.rglob("*.py"))
        if not (path.parent == PACKAGE_ROOT and path.stem == "__init__")
    ]


def _flat_names() -> dict[tuple[str, ...], str]:
    """Module path parts (a package: the parts of its folder) → the name of its flat file."""
    from .configuration import M2RNNConfig
    from .models import M2RNNForCausalLM

    entries = {
        Path(inspect.getfile(M2RNNConfig)).resolve(): CONFIG_ENTRY,
        Path(inspect.getfile(M2RNNForCausalLM)).resolve(): MODELING_ENTRY,
    }
    names = {}
    for path in _module_files():
        parts = tuple(_package_of(path) + ([] if path.stem == "__init__" else [path.stem]))
        if path.resolve() in entries:
            names[parts] = entries[path.resolve()]
        elif len(parts) == 1 and _is_flat_name(parts[0]):
            names[parts] = parts[0]   # saving from a checkpoint's own code: its files are flat already
        else:
            names[parts] = f"{MODELING_ENTRY}_" + "_".join(parts)
    return names


def _rewrite_imports(source: str, package: list[str], names: dict[tuple[str, ...], str]) -> str:
    def rewrite(match: re.Match) -> str:
        indent, dots, dotted = match.group(1), match.group(2), match.group(3)
        levels_up = len(dots) - 1
        if levels_up > len(package):
            raise ValueError(f"relative import {dots}{dotted} leaves the package")
        target = tuple(package[: len(package) - levels_up] + (dotted.split(".") if dotted else []))
        if target not in names:
            raise ValueError(f"relative import {dots}{dotted} names no module of the package")
        return f"{indent}from .{names[target]} import "

    return _RELATIVE_IMPORT.sub(rewrite, source)


def remote_code_files(directory) -> list[Path]:
    """The files `export_remote_code` writes into `directory`."""
    return [Path(directory) / f"{name}.py" for name in sorted(_flat_names().values())]


def _written_by_us(path: Path) -> bool:
    """A file of ours: it starts with the marker, or it is code an earlier version of this package wrote beside a
    checkpoint (named by the auto_map of the m2rnn config.json next to it)."""
    with path.open(encoding="utf-8", errors="replace") as file:
        if file.readline().rstrip("\n") == MARKER:
            return True
    try:
        config = json.loads((path.parent / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(config, dict) or config.get("model_type") != "m2rnn":
        return False
    auto_map = config.get("auto_map") or {}
    return isinstance(auto_map, dict) and any(str(ref).split(".")[0] == path.stem for ref in auto_map.values())


def check_remote_code_targets(directory) -> None:
    """Raise a ValueError naming any file `export_remote_code` would overwrite that this package did not write."""
    foreign = [path for path in remote_code_files(directory) if path.exists() and not _written_by_us(path)]
    if foreign:
        raise ValueError(
            f"save_pretrained writes the model's code as {[p.name for p in foreign]} in {directory}, where files of "
            f"these names exist that it did not write: {[str(p) for p in foreign]}. Nothing was saved; move them or "
            "save to another directory."
        )


def export_remote_code(directory) -> list[Path]:
    """Write every module of the package into `directory` as flat files and add `auto_map` to its config.json.
    The caller runs `check_remote_code_targets` first, before it writes anything of its own."""
    directory = Path(directory)
    names = _flat_names()
    written = []
    for path in _module_files():
        parts = tuple(_package_of(path) + ([] if path.stem == "__init__" else [path.stem]))
        source = path.read_text(encoding="utf-8")
        source = source.removeprefix(MARKER + "\n")   # saving from a checkpoint's own code
        target = directory / f"{names[parts]}.py"
        target.write_text(f"{MARKER}\n{_rewrite_imports(source, _package_of(path), names)}", encoding="utf-8")
        written.append(target)

    config_file = directory / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["auto_map"] = AUTO_MAP
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return written
