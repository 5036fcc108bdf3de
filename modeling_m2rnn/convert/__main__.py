"""`python -m modeling_m2rnn.convert --from lm-engine SRC DST`: an lm-engine checkpoint → a folder that
`AutoModelForCausalLM.from_pretrained` loads. `--to lm-engine SRC DST`: the other way, to train on in lm-engine."""

import argparse

from .lm_engine import DEFAULT_MAX_SHARD_SIZE, convert_lm_engine_checkpoint
from .to_lm_engine import export_lm_engine_checkpoint

FORMATS = ("lm-engine",)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m modeling_m2rnn.convert", description=__doc__)
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from", dest="source_format", choices=FORMATS, help="the framework that wrote SRC")
    direction.add_argument("--to", dest="target_format", choices=FORMATS, help="the framework to write DST for "
                           "(SRC: a folder of ours that save_pretrained wrote)")
    parser.add_argument("src", help="with --from: an lm-engine checkpoint, unsharded (config.json + safetensors) or "
                        "distributed (model folder, global_step* folder or the training save path)")
    parser.add_argument("dst", help="new folder to write (must be empty or absent)")
    parser.add_argument("--config", help="with --from: lm-engine's model config.json, when SRC has none readable")
    parser.add_argument("--max-shard-size", type=int, default=DEFAULT_MAX_SHARD_SIZE,
                        help="with --from: bytes per output shard from a distributed checkpoint (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.target_format is not None:
        dst = export_lm_engine_checkpoint(args.src, args.dst, progress=not args.no_progress)
    else:
        dst = convert_lm_engine_checkpoint(args.src, args.dst, config=args.config, max_shard_size=args.max_shard_size,
                                           progress=not args.no_progress)
    print(f"converted {args.src} -> {dst}")


if __name__ == "__main__":
    main()
