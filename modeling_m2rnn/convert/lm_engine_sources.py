"""Reading an lm-engine checkpoint a group of tensors at a time: its unsharded safetensors (one file, or shards with
an index, as lm-engine's `unshard` writes them) or a training checkpoint (torch distributed checkpoint, DCP).

A DCP training checkpoint is `SAVE_PATH/global_step{N}/model` (keys `state.model.<name>`) or, saved
asynchronously, `.../model_optimizer` (keys `state.model.model.<name>`, beside the optimizer's); the model's config
is in `global_step{N}/training_config.yml` under `model_args.pretrained_config`.
"""

import json
import re
import warnings
from pathlib import Path

import torch

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_FILE = "model.safetensors"
DCP_METADATA = ".metadata"
TRAINING_CONFIG = "training_config.yml"
LATEST_ITERATION = "latest_checkpointed_iteration.json"
_DCP_FOLDERS = ("model", "model_optimizer")
_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def natural_key(name: str):
    """'transformer.h.10.x' after 'transformer.h.9.x': layer numbers compared as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


class SafetensorsSource:
    """A safetensors checkpoint folder (lm-engine's unsharded layout, or ours): `model.safetensors`, or shards listed
    in `model.safetensors.index.json`. Each group is one shard file."""

    def __init__(self, folder: Path):
        self.folder = folder
        index = folder / SAFETENSORS_INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()), key=natural_key)
            self.groups = [(file, sorted((n for n, f in weight_map.items() if f == file), key=natural_key))
                           for file in files]
        else:
            from safetensors import safe_open

            with safe_open(folder / SAFETENSORS_FILE, framework="pt") as f:
                self.groups = [(SAFETENSORS_FILE, sorted(f.keys(), key=natural_key))]

    def tensor_specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """name → (shape, dtype), read from the files' headers."""
        from safetensors import safe_open

        specs = {}
        for file, names in self.groups:
            with safe_open(self.folder / file, framework="pt") as f:
                for name in names:
                    tensor_slice = f.get_slice(name)
                    dtype = tensor_slice.get_dtype()
                    if dtype not in _SAFETENSORS_DTYPES:
                        raise ValueError(f"tensor {name!r} has dtype {dtype}, not a floating-point type")
                    specs[name] = (tuple(tensor_slice.get_shape()), _SAFETENSORS_DTYPES[dtype])
        return specs

    def load_groups(self):
        """Yields one {name: tensor} per shard; only that shard's tensors are in memory."""
        from safetensors import safe_open

        for file, names in self.groups:
            with safe_open(self.folder / file, framework="pt") as f:
                yield {name: f.get_tensor(name) for name in names}


class DCPSource:
    """A torch distributed checkpoint of lm-engine's training loop, read with torch's own DCP reader in this process
    (no process group). Groups hold at most `max_group_bytes` of tensors (one tensor alone may be larger)."""

    def __init__(self, folder: Path, max_group_bytes: int):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.folder = folder
        metadata = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
        prefix = "state.model.model." if folder.name == "model_optimizer" else "state.model."
        self.keys = {}     # lm-engine tensor name → DCP key
        self.sizes = {}    # lm-engine tensor name → (shape, dtype)
        for key, item in metadata.items():
            if key.startswith(prefix) and isinstance(item, TensorStorageMetadata):
                name = key.removeprefix(prefix)
                self.keys[name] = key
                self.sizes[name] = (item.size, item.properties.dtype)
        if not self.keys:
            raise ValueError(f"{folder} holds no model tensor under {prefix!r}: not an lm-engine DCP checkpoint")
        self.groups = []
        group, group_bytes = [], 0
        for name in sorted(self.keys, key=natural_key):
            shape, dtype = self.sizes[name]
            nbytes = shape.numel() * dtype.itemsize
            if group and group_bytes + nbytes > max_group_bytes:
                self.groups.append(group)
                group, group_bytes = [], 0
            group.append(name)
            group_bytes += nbytes
        self.groups.append(group)

    def tensor_specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """name → (shape, dtype), read from the checkpoint's metadata."""
        return {name: (tuple(shape), dtype) for name, (shape, dtype) in self.sizes.items()}

    def load_groups(self):
        """Yields one {name: tensor} per group, read into freshly allocated tensors with torch's public `dcp.load`
        (no process group: `no_dist`). DCP matches tensors by their flattened key, so {"state": {"model.x": t}}
        reads `state.model.x` whichever nesting wrote it."""
        import torch.distributed.checkpoint as dcp

        for group in self.groups:
            tensors = {name: torch.empty(self.sizes[name][0], dtype=self.sizes[name][1]) for name in group}
            request = {"state": {self.keys[name].removeprefix("state."): tensor for name, tensor in tensors.items()}}
            with warnings.catch_warnings():
                # "torch.distributed is unavailable or uninitialized, assuming ... a single process": as intended
                warnings.filterwarnings("ignore", message=r".*torch\.distributed is .*", category=UserWarning)
                dcp.load(request, checkpoint_id=str(self.folder), no_dist=True)
            yield tensors


def find_dcp_folder(src: Path) -> Path | None:
    """The DCP model folder that `src` names: itself, its `model` / `model_optimizer` sub-folder (a global_step
    folder), or that of the latest iteration (a training run's save path). None if `src` is none of these."""
    if (src / DCP_METADATA).is_file():
        return src
    if (src / LATEST_ITERATION).is_file():
        iteration = json.loads((src / LATEST_ITERATION).read_text(encoding="utf-8"))["latest_checkpointed_iteration"]
        src = src / f"global_step{iteration}"
    for name in _DCP_FOLDERS:
        if (src / name / DCP_METADATA).is_file():
            return src / name
    return None


def read_dcp_training_config(dcp_folder: Path) -> dict | None:
    """The model config of a DCP checkpoint, from its global_step folder's training_config.yml; None if absent.
    Raises ValueError for a checkpoint saved with tensor parallelism (its fused projections are laid out per rank)."""
    path = dcp_folder.parent / TRAINING_CONFIG
    if not path.is_file():
        return None
    import yaml

    training = yaml.safe_load(path.read_text(encoding="utf-8"))
    tp = (training.get("distributed_args") or {}).get("tensor_parallel_world_size", 1)
    if tp != 1:
        raise ValueError(f"lm-engine option `distributed_args.tensor_parallel_world_size` = {tp} is not supported: "
                         "unshard the checkpoint with lm-engine's unshard step first, then convert its output")
    model_args = training.get("model_args") or {}
    return model_args.get("pretrained_config")
