"""Quickstart: build a small hybrid M2RNN through the Auto classes, train it, save, reload, generate.

The embedded default task is character-level language modelling of the short text below, so nothing is
downloaded; it runs in a few minutes on two CPU cores. Pass --text FILE to learn another text.

    python examples/quickstart.py [--steps 300] [--output outputs/quickstart]
"""

import argparse
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM

import modeling_m2rnn  # noqa: F401  (registers the "m2rnn" model type with the Auto classes)

EMBEDDED_TEXT = """\
An M2RNN layer keeps a small matrix for every head. At each step the matrix is multiplied by a learned
transition, the outer product of a key and a value is added, and tanh folds the sum back into the unit
box. A forget gate blends the old matrix with the new one, and a query reads a vector out of it. Because
the update is non-linear, the layer can track states that linear recurrences cannot, such as the running
product of permutations. A few attention layers among many recurrent ones give the hybrid its recall.
"""


class CharTokenizer:
    """Characters to ids and back; id 0 is padding."""

    def __init__(self, text: str):
        self.chars = sorted(set(text))
        self.index = {c: i + 1 for i, c in enumerate(self.chars)}

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 1

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([self.index[c] for c in text])

    def decode(self, ids) -> str:
        return "".join(self.chars[i - 1] for i in ids if i > 0)


def random_windows(data: torch.Tensor, batch_size: int, length: int, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(data) - length, (batch_size,), generator=generator)
    return torch.stack([data[s : s + length] for s in starts.tolist()])


def train(model, data, steps: int, batch_size: int, length: int, learning_rate: float) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    generator = torch.Generator().manual_seed(0)
    losses = []
    model.train()
    progress = tqdm(range(steps), desc="training")
    for _ in progress:
        batch = random_windows(data, batch_size, length, generator)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        progress.set_postfix(loss=f"{loss.item():.3f}")
    return losses


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", type=Path, help="a UTF-8 text file to learn instead of the embedded text")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--output", type=Path, default=Path("outputs/quickstart"))
    args = parser.parse_args()

    text = args.text.read_text(encoding="utf-8") if args.text else EMBEDDED_TEXT
    tokenizer = CharTokenizer(text)
    data = tokenizer.encode(text)
    torch.manual_seed(0)

    # A hybrid: three M2RNN layers and one attention layer (the paper puts attention at layers 4, 12, 20 of 24).
    config = AutoConfig.for_model(
        "m2rnn",
        vocab_size=tokenizer.vocab_size,
        hidden_size=96,
        intermediate_size=256,
        num_hidden_layers=4,
        layer_types=["m2rnn", "m2rnn", "full_attention", "m2rnn"],
        num_attention_heads=4,
        m2rnn_k_head_dim=16,
        m2rnn_v_head_dim=8,
        m2rnn_num_v_heads=8,
        m2rnn_num_f_heads=8,
        m2rnn_num_g_heads=8,
        m2rnn_num_weight_heads=8,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )
    model = AutoModelForCausalLM.from_config(config)
    print(f"{type(model).__name__}: {sum(p.numel() for p in model.parameters()) / 1e3:.0f}K parameters, "
          f"layers {config.layer_types}")

    losses = train(model, data, args.steps, args.batch_size, args.length, args.learning_rate)
    print(f"loss: {sum(losses[:10]) / 10:.3f} over the first 10 steps -> {sum(losses[-10:]) / 10:.3f} over the last 10")

    model.save_pretrained(args.output)
    reloaded = AutoModelForCausalLM.from_pretrained(args.output).eval()
    print(f"saved to {args.output} and reloaded as {type(reloaded).__name__}")

    prompt = text[:24]
    generated = reloaded.generate(tokenizer.encode(prompt)[None], max_new_tokens=160, do_sample=False)
    completion = tokenizer.decode(generated[0].tolist())
    print(f"\nprompt:    {prompt!r}\ngenerated: {completion!r}")
    matched = next((i for i, (a, b) in enumerate(zip(completion, text)) if a != b), min(len(completion), len(text)))
    print(f"the model reproduces the first {matched} characters of the training text "
          f"from a {len(prompt)}-character prompt")


if __name__ == "__main__":
    main()
