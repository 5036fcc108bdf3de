"""`python -m modeling_m2rnn.convert --from lm-engine SRC DST`: convert a checkpoint into a folder that
`AutoModelForCausalLM.from_pretrained` loads."""

import argparse

from .lm_engine import DEFAULT_MAX_SHARD_SIZE, convert_lm_engine_checkpoint

FORMATS = ("lm-engine",)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m modeling_m2rnn.convert", description=__doc__)
    parser.add_argument("--from", dest="source_format", required=True, choices=FORMATS,
                        help="the framework that wrote SRC")
    parser.add_argument("src", help="lm-engine checkpoint: an unsharded folder (config.json + safetensors) or a "
                        "distributed checkpoint (model folder, global_step* folder or the training save path)")
    parser.add_argument("dst", help="new folder to write (must be empty or absent)")
    parser.add_argument("--config", help="lm-engine model config.json, when SRC has none readable")
    parser.add_argument("--max-shard-size", type=int, default=DEFAULT_MAX_SHARD_SIZE,
                        help="bytes per output shard from a distributed checkpoint (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    dst = convert_lm_engine_checkpoint(args.src, args.dst, config=args.config, max_shard_size=args.max_shard_size,
                                       progress=not args.no_progress)
    print(f"converted {args.src} -> {dst}")


if __name__ == "__main__":
    main()
