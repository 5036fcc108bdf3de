"""Fine-tune (or train from scratch) an M2RNN model with transformers.Trainer on a causal-LM objective.

With no arguments it trains a small hybrid M2RNN on an embedded text with a byte-level tokenizer built in
code, so nothing is downloaded; it runs in well under a minute on two CPU cores (30 steps of 8 × 32 tokens), and the
eval loss falls at every evaluation.

    python examples/finetune.py                                    # embedded text, small hybrid, 30 steps
    python examples/finetune.py --model path/to/checkpoint --data corpus.jsonl --text-field text
    python examples/finetune.py --preset hybrid-m2rnn-400m --data corpus.txt --bf16 --packing
    python examples/finetune.py --lora --model path/to/checkpoint     # PEFT LoRA adapters only
    accelerate launch --num_processes 2 examples/finetune.py ...    # DDP; add --fsdp for FSDP2

--data reads plain text (one document per line; *.txt) or JSON lines (*.jsonl / *.json, field --text-field).
Without --packing, documents are joined and cut into blocks of --seq-len tokens. With --packing, each
document (cut to --seq-len) stays whole and DataCollatorWithFlattening lays a batch end to end in one row
with position_ids restarting at 0 per document: M2RNN layers restart their state there, and attention
layers get a block-diagonal mask, so no token attends or recurs across documents and nothing is padded.

The run ends with the eval loss and a checkpoint in --output-dir that AutoModelForCausalLM.from_pretrained
loads (with --lora: the adapters there, and the merged model in --output-dir/merged). The losses logged along
the way are in --output-dir/trainer_state.json (benchmarks/check_multi_gpu.py compares them across launches).
"""

import argparse
import math
from pathlib import Path

import torch
from datasets import Dataset, load_dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorWithFlattening,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
    default_data_collator,
)

from modeling_m2rnn import PRESETS, M2RNNConfig  # the import also registers "m2rnn" with the Auto classes

# The linear layers LoRA adapts: the M2RNN mixer's projections, attention, and the SwiGLU MLP.
LORA_TARGET_MODULES = [
    "in_proj", "out_proj",                          # M2RNN layers
    "q_proj", "k_proj", "v_proj", "o_proj",         # attention layers
    "gate_proj", "up_proj", "down_proj",            # MLPs
]

EMBEDDED_DOCUMENTS = [
    "An M2RNN layer keeps a small matrix for every head and updates it at every token.",
    ("The old matrix is multiplied by a learned transition, the outer product of a key and a value is added, "
     "and tanh folds the sum back into the unit box."),
    "A forget gate blends the old matrix with the new one; a query then reads a vector out of the state.",
    ("Because the update is non-linear, the layer can track states that linear recurrences cannot, "
     "such as the running product of permutations."),
    "A few attention layers among many recurrent ones give the hybrid model its recall of exact tokens.",
    "The state has a fixed size, so generating a token costs the same at the start and at the end of a book.",
    ("Packed sequences restart the state at every document boundary, and the short convolution never looks "
     "across one."),
    "Training runs the recurrence over the whole sequence; decoding carries the state from one token to the next.",
    "Each head reads its own query and writes its own key and value, and the heads never exchange their states.",
    "The forget gate is computed in float32, because in bfloat16 a gate close to one would round to one.",
    "A padded position leaves the state as it was: its forget gate is one and its input is zero.",
    "The short convolution in front of the recurrence mixes each channel with the three tokens before it.",
    "At the start of training the transition matrix is the identity and the residual weight is one.",
    "The output of the recurrence is gated, normalised over all heads and projected back to the model width.",
    "A prompt can be run once and its state saved to a file, so that later questions continue from it.",
    "The cache of a hybrid holds a matrix per recurrent layer and the keys and values of every attention layer.",
    "On a GPU the recurrence runs on Triton kernels; on a CPU the reference loop computes the same numbers.",
    "The gradient reaching each state is clamped, which keeps long sequences from blowing up in training.",
    "Left padding and right padding give each row what it would get alone, token for token.",
    "A model of four layers with one attention layer learns the statistics of this text in a few dozen steps.",
]


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """256 byte tokens after <pad> (id 0) and <eos> (id 1): any text, no download, saved with the checkpoint."""
    specials = ["<pad>", "<eos>"]
    vocab = {token: i for i, token in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))   # no merges: one token per byte
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>")


def small_config(vocab_size: int, tokenizer) -> M2RNNConfig:
    """A hybrid small enough for a CPU: three M2RNN layers and one attention layer."""
    return M2RNNConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=4,
        layer_types=["m2rnn", "m2rnn", "full_attention", "m2rnn"],
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=32,
        m2rnn_k_head_dim=32,
        m2rnn_v_head_dim=16,
        m2rnn_num_v_heads=8,
        m2rnn_num_f_heads=8,
        m2rnn_num_g_heads=8,
        m2rnn_num_weight_heads=8,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )


def load_documents(path: Path | None, text_field: str) -> Dataset:
    """A dataset with one document per row, the text in column `text_field` (the "text" builder names it "text")."""
    if path is None:
        return Dataset.from_dict({text_field: EMBEDDED_DOCUMENTS})
    builder = "json" if path.suffix in (".json", ".jsonl") else "text"
    dataset = load_dataset(builder, data_files=str(path), split="train")
    if text_field not in dataset.column_names:
        raise ValueError(
            f"{path} has no field {text_field!r}; its fields are {dataset.column_names} (see --text-field)"
        )
    return dataset.filter(lambda row: bool(row[text_field] and row[text_field].strip()))


def tokenize(documents: Dataset, text_field: str, tokenizer, seq_len: int, packing: bool) -> Dataset:
    """Token blocks of at most seq_len: whole documents for packing, else the concatenation cut into blocks."""
    end_of_document = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]

    def encode(rows):
        ids = tokenizer(rows[text_field], add_special_tokens=False)["input_ids"]
        return {"input_ids": [doc + end_of_document for doc in ids]}

    def cut_into_blocks(rows):
        stream = [token for doc in rows["input_ids"] for token in doc]
        usable = len(stream) // seq_len * seq_len   # a short tail would need padding; it is dropped
        blocks = [stream[i : i + seq_len] for i in range(0, usable, seq_len)]
        return {"input_ids": blocks, "labels": blocks}   # the model shifts the labels itself

    def truncate(rows):
        return {"input_ids": [doc[:seq_len] for doc in rows["input_ids"]]}

    tokens = documents.map(encode, batched=True, remove_columns=documents.column_names)
    # without packing the blocks change in number, so the old column goes
    return tokens.map(truncate if packing else cut_into_blocks, batched=True, remove_columns=["input_ids"])


def check_enough_blocks(blocks: Dataset, args) -> None:
    """One block to train on and one to evaluate at the least; the sampler would fail with `num_samples=0`."""
    if len(blocks) >= 2:
        return
    source = args.data if args.data is not None else "the embedded text"
    if args.packing:
        unit, remedy = "document(s)", "a --data file with more documents"
    else:
        unit, remedy = f"block(s) of --seq-len {args.seq_len} tokens", "a longer --data file or a smaller --seq-len"
    raise ValueError(f"{source} gives {len(blocks)} {unit}; training and evaluation need at least 2: pass {remedy}")


def build_model(args, tokenizer):
    if args.model is not None:
        model = AutoModelForCausalLM.from_pretrained(args.model)
    else:
        config = (M2RNNConfig.from_preset(args.preset) if args.preset else small_config(len(tokenizer), tokenizer))
        model = AutoModelForCausalLM.from_config(config)
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                         f"{model.config.vocab_size}")
    # No cache while training: transformers builds the packed (block-diagonal) attention mask from
    # position_ids only when no cache is passed, and a cache would only hold states nobody reads.
    model.config.use_cache = False
    if args.lora:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.0,
                          target_modules=LORA_TARGET_MODULES, task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
        model.print_trainable_parameters()
    return model


def training_arguments(args) -> TrainingArguments:
    # FSDP2, fully sharded (reshard after forward); transformers wraps each module named in `_no_split_modules`
    # (M2RNNDecoderLayer) as one shard unit and gathers a full state dict for the final save.
    fsdp, fsdp_config = (True, {"version": 2, "reshard_after_forward": True}) if args.fsdp else (None, None)
    return TrainingArguments(
        output_dir=str(args.output_dir),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        weight_decay=0.1,
        warmup_steps=0.05,                   # a fraction of max_steps
        lr_scheduler_type="cosine",
        max_grad_norm=1.0,
        logging_steps=max(1, args.max_steps // 20),
        eval_strategy="steps",
        eval_steps=max(1, args.max_steps // 4),
        save_strategy="no",                  # one checkpoint at the end, written below
        bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing,
        torch_compile=args.torch_compile,
        fsdp=fsdp,
        fsdp_config=fsdp_config,
        # every parameter takes part in every step; the Trainer's default (True, without gradient checkpointing)
        # would make DDP walk the autograd graph once more per step looking for unused ones, and warn
        ddp_find_unused_parameters=False,
        seed=args.seed,
        report_to="none",
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", type=Path, help="a checkpoint directory to fine-tune")
    source.add_argument("--preset", choices=sorted(PRESETS), help="train one of the paper's configs from scratch")
    parser.add_argument("--data", type=Path, help="a .txt (one document per line) or .jsonl file")
    parser.add_argument("--text-field", default="text", help="the JSON field that holds the text")
    parser.add_argument("--tokenizer", type=Path, help="a local tokenizer directory (default: byte-level)")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/finetune"))
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8, help="per device")
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--eval-fraction", type=float, default=0.1)
    parser.add_argument("--packing", action="store_true", help="pack documents with DataCollatorWithFlattening")
    parser.add_argument("--lora", action="store_true", help="train PEFT LoRA adapters instead of all weights")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (mixed precision)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--torch-compile", action="store_true")
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 (under accelerate launch / torchrun)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer) if args.tokenizer else byte_level_tokenizer()

    documents = load_documents(args.data, args.text_field)
    blocks = tokenize(documents, args.text_field, tokenizer, args.seq_len, args.packing)
    check_enough_blocks(blocks, args)
    split = blocks.train_test_split(test_size=args.eval_fraction, seed=args.seed)
    # every block has seq_len tokens without packing, so stacking them needs no padding
    collator = DataCollatorWithFlattening() if args.packing else default_data_collator

    model = build_model(args, tokenizer)
    trainer = Trainer(
        model=model,
        args=training_arguments(args),
        train_dataset=split["train"],
        eval_dataset=split["test"],
        data_collator=collator,
        processing_class=tokenizer,
    )
    if args.fsdp and not trainer.is_fsdp_enabled:
        # accelerate applies FSDP only to processes on GPUs (or other accelerators); anywhere else (one process, or
        # CPU processes on gloo) it would train unsharded or with DDP and say nothing
        raise SystemExit(f"--fsdp: this launch does not shard (accelerate's distributed type is "
                         f"{trainer.accelerator.distributed_type}); FSDP needs several GPUs under accelerate "
                         f"launch or torchrun")
    trainer.train()
    eval_loss = trainer.evaluate()["eval_loss"]
    trainer.save_model(str(args.output_dir))   # the full model, or the adapters with --lora
    if args.lora and trainer.is_world_process_zero():
        merged = trainer.model.merge_and_unload()
        merged.save_pretrained(args.output_dir / "merged")
        tokenizer.save_pretrained(args.output_dir / "merged")
    if trainer.is_world_process_zero():
        # the loss at every logging step and every eval, so that two launches of the same run can be compared
        trainer.state.save_to_json(str(args.output_dir / "trainer_state.json"))
        print(f"eval loss {eval_loss:.4f} (perplexity {math.exp(min(eval_loss, 50)):.2f}); saved to {args.output_dir}")
    # Every process waits for the others, then takes its process group down here, not at interpreter exit (where a
    # gloo process that finished first once aborted, after the run was saved).
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
    return trainer


if __name__ == "__main__":
    main()
