"""Training throughput of the paper's models (any preset) beside the same-size Llama, in one process.

Run from the repo root: PYTHONPATH=. python benchmarks/bench_train.py [--models PRESET ... llama] [--layers N]
[--profile] [--quick]

"llama-is-causal" is the same Llama with its attention on SDPA's `is_causal`: under torch.compile transformers builds
a (B, 1, S, S) causal mask, which keeps SDPA off its flash kernel (the M2RNN models pass `is_causal` where nothing
else is masked).

One full training step = forward and loss under bf16 autocast (float32 weights), backward, fused AdamW step,
zero_grad, exactly as the Llama anchor below was measured. Warm-up steps first (Triton autotuning and
compilation happen there), then timed steps between CUDA events. Peak memory is
torch.cuda.max_memory_allocated over the timed steps. A table is printed beside the anchor; JSON goes to
benchmarks/results/bench_train.json, replacing the previous run's (not under --quick), and to $OUT when set.
--profile prints a torch.profiler table of one step of the first preset at the first shape (where the time goes),
compiled under --compile. --compile wraps every model in torch.compile (the M2RNN scan stays one custom op; the
elementwise work around it fuses), --models (preset names, and "llama") and --shapes pick cases; --layers N keeps
the first N layers of each preset (a slice of a model too large for one GPU, e.g. the 7B MoE hybrids). --quick runs
tiny versions of the same models on the CPU as a smoke check of this script.
"""

import argparse
import json
import time

import torch
from run_info import run_info, write_results  # (benchmarks/ is the script's folder, on sys.path)
from transformers import AttentionInterface, AutoModelForCausalLM, LlamaConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from modeling_m2rnn import M2RNNConfig
from modeling_m2rnn.configuration import PRESETS
from modeling_m2rnn.kernels.gated_delta_rule.fla import fla_backward_refusal, fla_is_available

GiB = 2**30

# LlamaForCausalLM at the paper's 400M dimensions on the H200, 2026-11-28, torch 2.11, transformers 5.17:
# benchmarks/results/anchors/llama400m_h200_2026-11-28.json, "train".
LLAMA_ANCHOR = {
    (8, 4096): dict(tokens_per_s=77938, ms_per_step=420.4, peak_GiB=85.3),
    (32, 1024): dict(tokens_per_s=86105, ms_per_step=380.6, peak_GiB=85.3),
}
SHAPES = [(8, 4096), (32, 1024)]   # (B, S)
TARGET = "Hybrid M2RNN 400M >= 85% of Llama's tokens/s at B=8, S=4096"

LLAMA_400M = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
                  intermediate_size=2752, vocab_size=100352, tie_word_embeddings=False, max_position_embeddings=4096)
DEFAULT_MODELS = ["hybrid-m2rnn-400m", "m2rnn-400m", "llama"]
LLAMAS = ["llama", "llama-is-causal"]
# An attention implementation transformers has no mask function for: it then builds no mask, and SDPA runs is_causal.
IS_CAUSAL_SDPA = "sdpa_is_causal"
AttentionInterface.register(IS_CAUSAL_SDPA, sdpa_attention_forward)
TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=128, vocab_size=256,
            tie_word_embeddings=False)
TINY_MIXERS = dict(head_dim=16, m2rnn_k_head_dim=16, m2rnn_v_head_dim=8, m2rnn_num_v_heads=4, m2rnn_num_f_heads=4,
                   m2rnn_num_g_heads=4, m2rnn_num_weight_heads=4, gdn_num_heads=2, gdn_key_head_dim=16,
                   gdn_value_head_dim=32, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                   shared_expert_intermediate_size=64, bos_token_id=None, eos_token_id=None, pad_token_id=None)


def model_config(name: str, quick: bool, layers: int | None):
    """A preset (its first `layers` layers if given) or Llama at the 400M dimensions; tiny versions for --quick."""
    if name in LLAMAS:
        return LlamaConfig(**TINY, num_hidden_layers=2) if quick else LlamaConfig(**LLAMA_400M)
    if quick:
        layers = layers or 6   # the first six layers of a hybrid hold an attention layer
        return M2RNNConfig.from_preset(name, num_hidden_layers=layers, **TINY, **TINY_MIXERS)
    return M2RNNConfig.from_preset(name, **({"num_hidden_layers": layers} if layers else {}))


def attention_of(name: str) -> str:
    return IS_CAUSAL_SDPA if name == "llama-is-causal" else "sdpa"


def build(config, device: torch.device, compile: bool = False, attention: str = "sdpa"):
    config.use_cache = False   # a training step: no cache
    with device:
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attention)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    model.train()
    return (torch.compile(model) if compile else model), optimizer


def train_step(model, optimizer, ids):
    with torch.autocast(ids.device.type, dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def time_steps(model, optimizer, ids, warmup: int, steps: int) -> float:
    """Milliseconds per step, averaged over `steps` after `warmup` untimed steps."""
    for _ in range(warmup):
        train_step(model, optimizer, ids)
    if ids.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            train_step(model, optimizer, ids)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / steps
    began = time.perf_counter()
    for _ in range(steps):
        train_step(model, optimizer, ids)
    return (time.perf_counter() - began) * 1e3 / steps


def gated_deltanet_refusal(config, device: torch.device) -> str | None:
    """Why a model with Gated DeltaNet layers cannot train on fla's kernels here, or None. Its PyTorch reference
    loop would run instead, which is no training speed to report."""
    if "gated_deltanet" not in getattr(config, "mixer_types", []) or device.type != "cuda":
        return None
    if not fla_is_available():
        return "fla-core is not installed (pip install m2rnn[fla])"
    return fla_backward_refusal(device)


def measure(name, config, batch, seq_len, device, warmup, steps, compile=False) -> dict:
    result = dict(model=name, B=batch, S=seq_len, compiled=compile)
    refusal = gated_deltanet_refusal(config, device)
    if refusal:
        return {**result, "error": refusal}
    model = optimizer = None
    try:
        model, optimizer = build(config, device, compile, attention_of(name))
        ids = torch.randint(0, config.vocab_size, (batch, seq_len), device=device)
        ms = time_steps(model, optimizer, ids, warmup, steps)
        result.update(ms_per_step=ms, tokens_per_s=batch * seq_len / ms * 1e3,
                      params_M=sum(p.numel() for p in model.parameters()) / 1e6)
        if "sparse" in getattr(config, "mlp_layer_types", []):
            result["experts_implementation"] = config._experts_implementation
        if device.type == "cuda":
            result["peak_GiB"] = torch.cuda.max_memory_allocated() / GiB
    except torch.cuda.OutOfMemoryError:
        result["error"] = "out of memory"
    finally:
        del model, optimizer   # free this model's memory before the next one is built
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def print_table(results: list[dict], quick: bool):
    print(f"\n{'model':<38}{'B':>4}{'S':>6}{'ms/step':>10}{'tokens/s':>11}{'peak GiB':>10}{'vs llama':>10}"
          f"{'anchor llama tok/s':>20}")
    llama = {(r["B"], r["S"]): r.get("tokens_per_s") for r in results if r["model"] == "llama"}
    for r in results:
        shape = (r["B"], r["S"])
        anchor = f"{LLAMA_ANCHOR[shape]['tokens_per_s']:,}" if shape in LLAMA_ANCHOR and not quick else ""
        if "error" in r:
            print(f"{r['model']:<38}{r['B']:>4}{r['S']:>6}  {r['error']}")
            continue
        ratio = f"{r['tokens_per_s'] / llama[shape]:.0%}" if llama.get(shape) else "-"
        peak = f"{r['peak_GiB']:.1f}" if "peak_GiB" in r else "-"
        print(f"{r['model']:<38}{r['B']:>4}{r['S']:>6}{r['ms_per_step']:>10.1f}{r['tokens_per_s']:>11,.0f}{peak:>10}"
              f"{ratio:>10}{anchor:>20}")
    if not quick:
        print(f"target: {TARGET}; anchor: Llama 400M on the H200, 2026-11-28 (same step, torch 2.11)")


def profile_one_step(name, config, batch, seq_len, device, compile: bool = False):
    """A torch.profiler table of one training step, after warm-up: which kernels take the time."""
    from torch.profiler import ProfilerActivity, profile

    model, optimizer = build(config, device, compile)
    ids = torch.randint(0, config.vocab_size, (batch, seq_len), device=device)
    time_steps(model, optimizer, ids, warmup=2, steps=1)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        train_step(model, optimizer, ids)
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort_by = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=70)
    mode = "compiled" if compile else "eager"
    print(f"\nprofile of one {mode} {name} step at B={batch}, S={seq_len}:\n{table}")
    return table


def write_json(report: dict):
    # a --quick smoke check on the CPU leaves the GPU figures that benchmarks/RESULTS.md cites in place
    for path in write_results("bench_train.json", json.dumps(report, indent=1), repository=not report["quick"]):
        print(f"wrote {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny configs on the CPU, a smoke check")
    parser.add_argument("--profile", action="store_true", help="also profile one step of the first preset")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per case")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model")
    parser.add_argument("--models", nargs="+", choices=[*PRESETS, *LLAMAS], default=DEFAULT_MODELS,
                        help=f"presets, llama and/or llama-is-causal (default: {' '.join(DEFAULT_MODELS)})")
    parser.add_argument("--layers", type=int, help="keep the first N layers of each preset (a slice of the model)")
    parser.add_argument("--shapes", nargs="+", help="BxS cases, e.g. 8x4096 (default: 8x4096 32x1024)")
    args = parser.parse_args()

    device = torch.device("cpu" if args.quick else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("needs a CUDA GPU; use --quick for the CPU smoke check")
    if args.shapes:
        shapes = [tuple(int(n) for n in shape.split("x")) for shape in args.shapes]
    else:
        shapes = [(2, 64), (4, 32)] if args.quick else SHAPES
    warmup, steps = (1, 2) if args.quick else (args.warmup, args.steps)
    configs = {name: model_config(name, args.quick, args.layers) for name in args.models}

    results = []
    for batch, seq_len in shapes:
        for name, config in configs.items():
            result = measure(name, config, batch, seq_len, device, warmup, steps, args.compile)
            print(json.dumps(result), flush=True)
            results.append(result)
    print_table(results, args.quick)

    report = dict(
        what="training step: bf16 autocast forward+loss, backward, fused AdamW, zero_grad; "
             "ms per step over timed steps",
        **run_info(), quick=args.quick, compiled=args.compile, warmup=warmup, steps=steps, results=results,
        llama_anchor={f"B{b}_S{s}": v for (b, s), v in LLAMA_ANCHOR.items()},
    )
    report["layers"] = args.layers
    profiled = next((name for name in args.models if name not in LLAMAS), None)
    if args.profile and profiled is not None:
        report["profile"] = profile_one_step(profiled, configs[profiled], *shapes[0], device, args.compile)
    write_json(report)


if __name__ == "__main__":
    main()
