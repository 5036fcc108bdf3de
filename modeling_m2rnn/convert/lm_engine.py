"""Convert an lm-engine checkpoint (the M2RNN paper's training framework, open-lm-engine/lm-engine) into a folder
that `AutoModelForCausalLM.from_pretrained` loads: our config, our safetensors and the `trust_remote_code` files.

Shard by shard: one source shard (or, from a DCP checkpoint, one group of at most `max_shard_size` bytes) is read,
converted and written before the next is read, so a 7B checkpoint never sits in memory twice. Before anything is
written the whole conversion is planned on shapes alone (meta tensors) and checked against the model our config
builds, so a checkpoint that does not convert leaves no half-written folder behind.
"""

import contextlib
import json
import shutil
from pathlib import Path

import torch

from .lm_engine_config import translate_config
from .lm_engine_sources import DCPSource, SafetensorsSource, find_dcp_folder, read_dcp_training_config
from .lm_engine_tensors import TensorMapping

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "tokenizer.model", "chat_template.jinja",
)
OUTPUT_INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = 5 * 2**30


def check_destination(dst: Path, src: Path):
    """A converter writes only into a new or empty folder: it never replaces a file someone has."""
    if dst.resolve() == src.resolve():
        raise ValueError(f"`dst` must differ from `src`, got {dst} for both")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ValueError(f"`dst` = {dst} must be an empty folder or not exist yet: the converter overwrites nothing")


@contextlib.contextmanager
def writing_into(dst: Path, src: Path):
    """Yields the list of paths a conversion writes into `dst`, with the tokenizer files of `src` copied last; if
    anything fails, every path on the list is removed again (and `dst` itself, when it was created here)."""
    created = not dst.exists()
    written = []
    try:
        dst.mkdir(parents=True, exist_ok=True)
        yield written
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                written.append(dst / name)
                shutil.copyfile(src / name, dst / name)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        if created and dst.exists() and not any(dst.iterdir()):
            dst.rmdir()
        raise


def _open_source(src: Path, config, max_shard_size: int):
    """(lm-engine config dict, source) for `src`; `config` (a dict or a config.json path) overrides the one found."""
    if isinstance(config, (str, Path)):
        config = json.loads(Path(config).read_text(encoding="utf-8"))
    if (src / "model.safetensors").is_file() or (src / "model.safetensors.index.json").is_file():
        source = SafetensorsSource(src)
        found = src / "config.json"
        if config is None and found.is_file():
            config = json.loads(found.read_text(encoding="utf-8"))
    elif (dcp_folder := find_dcp_folder(src)) is not None:
        source = DCPSource(dcp_folder, max_shard_size)
        if config is None:
            config = read_dcp_training_config(dcp_folder)
    else:
        raise ValueError(
            f"`src` = {src} is not an lm-engine checkpoint: expected model.safetensors, model.safetensors.index.json, "
            "or a distributed checkpoint (a folder with .metadata, a global_step* folder, or a training save path)"
        )
    if config is None:
        raise ValueError(f"no lm-engine model config found for {src}: pass `config` (a dict or a config.json path)")
    return config, source


def _expected_tensors(config) -> dict[str, tuple[int, ...]]:
    """name → shape of every tensor our model loads from a checkpoint, from the model built on the meta device."""
    from ..models import M2RNNForCausalLM

    with torch.device("meta"):
        model = M2RNNForCausalLM(config)
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    return expected


def _plan(source, mapping: TensorMapping, expected: dict) -> torch.dtype:
    """Convert meta tensors of the source's shapes and check the result against `expected`; returns the dtype of
    the embeddings (the checkpoint's dtype). Raises ValueError on any unknown, missing or misshapen tensor."""
    produced = {}
    specs = source.tensor_specs()
    for name, (shape, dtype) in specs.items():
        for ours, tensor in mapping.convert(name, torch.empty(shape, dtype=dtype, device="meta")).items():
            produced[ours] = (tuple(tensor.shape), name)
    for ours, (shape, name) in produced.items():
        if ours not in expected:
            raise ValueError(f"lm-engine tensor {name!r} converts to {ours!r}, which our model does not have")
        if shape != expected[ours]:
            raise ValueError(f"lm-engine tensor {name!r} converts to {ours!r} of shape {shape}, but the config "
                             f"gives {expected[ours]}")
    missing = sorted(set(expected) - set(produced))
    if missing:
        raise ValueError(f"the lm-engine checkpoint lacks tensors our model needs: {missing[:8]}"
                         + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    if "transformer.wte.weight" not in specs:
        raise ValueError("the lm-engine checkpoint has no `transformer.wte.weight`")
    return specs["transformer.wte.weight"][1]


def _write_shards(source, mapping: TensorMapping, dst: Path, progress: bool, written: list[Path]):
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    num_shards = len(source.groups)
    weight_map, total_size = {}, 0
    with tqdm(total=len(source.tensor_specs()), desc="converting tensors", unit="tensor", disable=not progress) as bar:
        for k, group in enumerate(source.load_groups(), start=1):
            file = "model.safetensors" if num_shards == 1 else f"model-{k:05d}-of-{num_shards:05d}.safetensors"
            shard = {}
            for name in list(group):
                shard.update(mapping.convert(name, group.pop(name)))
                bar.update()
            written.append(dst / file)
            save_file({name: tensor.contiguous() for name, tensor in shard.items()}, dst / file,
                      metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
            total_size += sum(tensor.numel() * tensor.element_size() for tensor in shard.values())
            del shard
    if num_shards > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        written.append(dst / OUTPUT_INDEX)
        (dst / OUTPUT_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def convert_lm_engine_checkpoint(src, dst, *, config=None, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
                                 progress: bool = True) -> Path:
    """Convert the lm-engine checkpoint `src` into a new folder `dst` and return `dst`.

    `src`: an unsharded lm-engine checkpoint (config.json + model.safetensors, or shards with
    model.safetensors.index.json), or a distributed (DCP) training checkpoint: its `model` folder, its
    `global_step*` folder or the training run's save path (latest iteration). Tokenizer files beside the weights
    are copied. `dst` must be empty or absent. `config`: lm-engine's model config (a dict or a config.json path)
    when `src` has none readable. `max_shard_size`: bytes per output shard from a DCP source (a safetensors source
    keeps its sharding). Raises ValueError naming the lm-engine option for anything our model cannot represent.
    """
    from ..configuration import M2RNNConfig
    from ..remote_code import export_remote_code

    src, dst = Path(src), Path(dst)
    check_destination(dst, src)
    lm_config, source = _open_source(src, config, max_shard_size)
    our_config = M2RNNConfig(**translate_config(lm_config))
    mapping = TensorMapping(lm_config)
    our_config.dtype = _plan(source, mapping, _expected_tensors(our_config))

    with writing_into(dst, src) as written:
        _write_shards(source, mapping, dst, progress, written)
        written.append(dst / "config.json")
        our_config.save_pretrained(dst)
        written.extend(export_remote_code(dst))
    return dst
