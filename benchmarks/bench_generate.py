"""Generation speed of the paper's 400M M2RNN models on one GPU: eager and with the static cache compiled.

    PYTHONPATH=. python benchmarks/bench_generate.py [--prompts 512 4096 16384] [--batches 1 16] [--new-tokens 128]
    PYTHONPATH=. python benchmarks/bench_generate.py --compile-mode max-autotune   # inductor tunes the B=1 products
    PYTHONPATH=. python benchmarks/bench_generate.py --profile --batches 1         # where a decode step's time goes
    PYTHONPATH=. python benchmarks/bench_generate.py --attn-implementation eager   # the hybrid's attention layers
    PYTHONPATH=. python benchmarks/bench_generate.py --batches 1 --repeats 5        # each compiled case timed 5 times

Random weights in bf16, greedy decoding of `--new-tokens` tokens after prompts of each length. For each model,
prompt length and batch size: prefill time (to the first token), ms per token after the prefill (the median
interval between consecutive tokens, each timed when generate checks its stopping criteria, so a noisy prefill
does not leak into it), tokens/s and peak memory. The same-size LlamaForCausalLM was measured on the same H200
with the same settings (`results/anchors/llama400m_h200_2026-11-28.json`); its figures are printed beside ours.
Each ms per token is also put beside its memory-bandwidth floor: the bytes a decode step must read (weights, plus
the KV cache of the attention layers, plus the M2RNN states read and written) over 4.2 TB/s.
"""

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from run_info import run_info  # (benchmarks/ is the script's folder, on sys.path)
from transformers import CompileConfig, StoppingCriteria, StoppingCriteriaList

from modeling_m2rnn import M2RNNConfig, M2RNNForCausalLM

HBM_BYTES_PER_S = 4.2e12
# results/anchors/llama400m_h200_2026-11-28.json: same hidden size, layers and vocabulary, H200, bf16, greedy.
LLAMA_EAGER_MS_PER_TOKEN = {(1, 512): 79.63, (1, 4096): 80.49, (1, 16384): 83.78,
                            (16, 512): 96.74, (16, 4096): 100.81, (16, 16384): 84.36}
LLAMA_COMPILED_MS_PER_TOKEN = {(1, 16384): 3.55, (16, 16384): 11.83}


def synchronize_time() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


def bandwidth_floor_ms(config: M2RNNConfig, num_parameters: int, batch: int, context: int) -> float:
    """Bytes one decode step must move through HBM, over the bandwidth: bf16 weights (the embedding row aside),
    the attention layers' keys and values, and each M2RNN state (float32) read and written."""
    weight_bytes = 2 * (num_parameters - config.vocab_size * config.hidden_size)
    attention_layers = config.layer_types.count("full_attention")
    kv_bytes = attention_layers * 2 * batch * config.num_key_value_heads * context * config.head_dim * 2
    m2rnn_layers = config.layer_types.count("linear_attention")
    state_size = config.m2rnn_num_heads * config.m2rnn_k_head_dim * config.m2rnn_v_head_dim
    state_bytes = m2rnn_layers * 2 * batch * state_size * 4
    return 1e3 * (weight_bytes + kv_bytes + state_bytes) / HBM_BYTES_PER_S


class TokenClock(StoppingCriteria):
    """Never stops; records a CUDA event when each new token is ready (generate checks its criteria once per token).
    Events neither wait for the GPU nor launch a kernel, so the clock adds nothing to the step it times."""

    def __init__(self, batch: int):
        self.events = []
        self.never = torch.zeros(batch, dtype=torch.bool, device="cuda")

    def __call__(self, input_ids, scores, **kwargs):
        self.events.append(torch.cuda.Event(enable_timing=True))
        self.events[-1].record()
        return self.never

    def intervals_ms(self) -> torch.Tensor:
        torch.cuda.synchronize()
        return torch.tensor([a.elapsed_time(b) for a, b in zip(self.events, self.events[1:])])


def decode_compile_config(mode: str) -> CompileConfig:
    """How generate compiles the decode step: torch.compile `mode`, whose CUDA graphs the model captures itself
    (generation/decode_graphs.py)."""
    return CompileConfig(fullgraph=True, mode=mode)


def static_compiled(max_cache_len: int, compile_config: CompileConfig) -> dict:
    """generate's options for the static cache with the decode step compiled."""
    return dict(cache_implementation="static", max_cache_len=max_cache_len, compile_config=compile_config)


def time_generate(model, prompt, new_tokens: int, **options) -> tuple[float, float, float]:
    """Seconds to the first token (the prefill), the median seconds per token after it, and the slowest token's
    (where a new cache's decode step is warmed up and captured)."""
    clock = TokenClock(prompt.shape[0])
    start = torch.cuda.Event(enable_timing=True)
    start.record()
    model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                   stopping_criteria=StoppingCriteriaList([clock]), **options)
    intervals = clock.intervals_ms()
    return start.elapsed_time(clock.events[0]) / 1e3, intervals.median().item() / 1e3, intervals.max().item() / 1e3


def measure(model, batch: int, prompt_len: int, new_tokens: int, mode: str, max_cache_len: int,
            compile_config: CompileConfig, repeats: int = 1) -> dict:
    """One case, timed `repeats` times after a warm-up: the medians, and every run's ms per token when repeated
    (batch-1 compiled decoding can change speed within a process: benchmarks/RESULTS.md, 2026-11-30)."""
    prompt = torch.randint(1, model.config.vocab_size, (batch, prompt_len), device="cuda")
    options = static_compiled(max_cache_len, compile_config) if mode == "static_compiled" else {}
    start = time.perf_counter()
    model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False, **options)   # compiles, warms up
    first_call_s = time.perf_counter() - start
    torch.cuda.reset_peak_memory_stats()
    runs = [time_generate(model, prompt, new_tokens, **options) for _ in range(repeats)]
    prefill = statistics.median(prefill for prefill, _, _ in runs)
    ms_per_token = 1e3 * statistics.median(seconds for _, seconds, _ in runs)
    result = dict(ms_per_token=round(ms_per_token, 3), tokens_per_s=round(1e3 * batch / ms_per_token, 1),
                  prefill_ms=round(1e3 * prefill, 1), peak_GiB=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                  slowest_token_ms=round(1e3 * statistics.median(slowest for _, _, slowest in runs), 2))
    if repeats > 1:
        result["ms_per_token_runs"] = [round(1e3 * seconds, 3) for _, seconds, _ in runs]
    if mode == "static_compiled":
        result["first_call_s"] = round(first_call_s, 1)
    return result


def compiled_logit_error(model, max_cache_len: int, compile_config: CompileConfig, steps: int = 16,
                         batch: int = 2) -> float:
    """Largest relative error of the compiled decode's logits against eager ones, over the steps before the two
    greedy sequences first differ (random bf16 weights have near-ties that a fused kernel can flip)."""
    prompt = torch.randint(1, model.config.vocab_size, (batch, 64), device="cuda")
    options = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, output_logits=True,
                   return_dict_in_generate=True)
    eager = model.generate(prompt, **options)
    compiled = model.generate(prompt, **static_compiled(max_cache_len, compile_config), **options)
    worst = 0.0
    for step, (a, b) in enumerate(zip(eager.logits, compiled.logits)):
        worst = max(worst, ((a.float() - b.float()).norm() / a.float().norm()).item())
        if not torch.equal(eager.sequences[:, 64 + step], compiled.sequences[:, 64 + step]):
            break
    return worst


def profile_decode(model, batch: int, max_cache_len: int, compile_config: CompileConfig, new_tokens: int = 32) -> str:
    """Where a compiled decode step's time goes: torch.profiler over `new_tokens` greedy tokens after a 16-token
    prompt (a prefill that small barely shows), GPU kernel time and launches per token beside the wall time."""
    prompt = torch.randint(1, model.config.vocab_size, (batch, 16), device="cuda")
    options = dict(**static_compiled(max_cache_len, compile_config), max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens, do_sample=False)
    model.generate(prompt, **options)   # compiles, and records the CUDA graphs
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    start = synchronize_time()
    with torch.profiler.profile(activities=activities) as profiler:
        model.generate(prompt, **options)
    wall_ms = 1e3 * (synchronize_time() - start)
    events = profiler.events()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_ms = sum(e.device_time for e in kernels) / 1e3
    # Host-side launches: one cudaGraphLaunch per replayed graph, or one cudaLaunchKernel per kernel without graphs.
    launches = {name: sum(e.name == name for e in events) / new_tokens
                for name in ("cudaGraphLaunch", "cudaLaunchKernel")}
    summary = (f"B={batch}: {new_tokens} tokens in {wall_ms:.1f} ms under the profiler "
               f"({wall_ms / new_tokens:.2f} ms/token); "
               f"GPU kernels {gpu_ms / new_tokens:.3f} ms/token, {len(kernels) / new_tokens:.0f} kernels/token; "
               f"host launches per token: " + ", ".join(f"{name} {count:.1f}" for name, count in launches.items()))
    per_kernel = {}
    for e in kernels:
        calls, time_us = per_kernel.get(e.name, (0, 0.0))
        per_kernel[e.name] = (calls + 1, time_us + e.device_time)
    lines = [f"{'kernel':100} {'per token':>9} {'us/token':>9}"]
    for name, (calls, time_us) in sorted(per_kernel.items(), key=lambda item: -item[1][1]):
        lines.append(f"{name[:100]:100} {calls / new_tokens:>9.2f} {time_us / new_tokens:>9.2f}")
    return summary + "\n" + "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["hybrid-m2rnn-400m", "m2rnn-400m"])
    parser.add_argument("--prompts", nargs="+", type=int, default=[512, 4096, 16384])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--modes", nargs="+", default=["eager", "static_compiled"])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--output", type=Path, default=Path(os.environ.get("OUT", "benchmarks/results")))
    parser.add_argument("--compile-mode", default="reduce-overhead", choices=["reduce-overhead", "max-autotune"],
                        help="torch.compile mode of the static-cache decode step (both replay CUDA graphs)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="time each compiled case this many times in a row and report the median and every run "
                             "(a compiled token waits on the host, whose speed varies; eager cases run once)")
    parser.add_argument("--skip-logit-check", action="store_true",
                        help="skip the compiled-vs-eager logit comparison (one compile fewer per model)")
    parser.add_argument("--attn-implementation", help="transformers attention of the attention layers (default: the "
                                                      "model's, sdpa)")
    parser.add_argument("--profile", action="store_true",
                        help="only profile each model's compiled decode at the first batch size, and print where it "
                             "goes")
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    report = dict(**run_info(), new_tokens=args.new_tokens, results={})
    compile_config = decode_compile_config(args.compile_mode)
    report["compile"] = dict(mode=args.compile_mode)
    report["attn_implementation"] = args.attn_implementation
    max_cache_len = max(args.prompts) + args.new_tokens   # one compiled graph per batch size serves every prompt

    rows = []
    for name in args.models:
        torch._dynamo.reset()   # one model per process, as a user has it: no other model's compiled steps to skip past
        torch.manual_seed(0)
        config = M2RNNConfig.from_preset(name, attn_implementation=args.attn_implementation)
        model = M2RNNForCausalLM(config).to("cuda", torch.bfloat16).eval()
        num_parameters = sum(p.numel() for p in model.parameters())
        if args.profile:
            print(name, profile_decode(model, args.batches[0], max_cache_len, compile_config), flush=True)
            continue
        logit_error_key = f"{name}_compiled_vs_eager_logit_error"
        if args.skip_logit_check:
            report["results"][logit_error_key] = "skipped"
        else:
            try:
                report["results"][logit_error_key] = compiled_logit_error(model, 256, compile_config)
            except Exception as error:
                report["results"][logit_error_key] = repr(error)[:500]
        for mode in args.modes:
            for batch in args.batches:
                for prompt_len in args.prompts:
                    key = f"{name}_{mode}_B{batch}_P{prompt_len}"
                    try:
                        repeats = args.repeats if mode == "static_compiled" else 1
                        result = measure(model, batch, prompt_len, args.new_tokens, mode, max_cache_len, compile_config,
                                         repeats)
                    except Exception as error:   # keep the other measurements of a limited GPU session
                        report["results"][key] = {"error": repr(error)[:500]}
                        print(key, "FAILED", repr(error)[:500], flush=True)
                        continue
                    result["floor_ms"] = round(bandwidth_floor_ms(config, num_parameters, batch, prompt_len), 3)
                    report["results"][key] = result
                    llama = (LLAMA_EAGER_MS_PER_TOKEN if mode == "eager" else LLAMA_COMPILED_MS_PER_TOKEN).get(
                        (batch, prompt_len))
                    rows.append((name, mode, batch, prompt_len, result, llama))
                    print(key, result, flush=True)
                    (args.output / "bench_generate.json").write_text(json.dumps(report, indent=1))
        del model
        torch.cuda.empty_cache()

    print(f"\n{report['gpu']}, torch {report['torch']}, commit {report['commit']}, {report['date']}, "
          f"greedy, {args.new_tokens} new tokens, bf16")
    print(f"{'model':20} {'mode':16} {'B':>3} {'prompt':>6} {'ms/tok':>8} {'floor':>7} {'tok/s':>8} "
          f"{'prefill ms':>10} {'peak GiB':>8} {'Llama ms/tok':>12}")
    for name, mode, batch, prompt_len, r, llama in rows:
        print(f"{name:20} {mode:16} {batch:>3} {prompt_len:>6} {r['ms_per_token']:>8.2f} {r['floor_ms']:>7.2f} "
              f"{r['tokens_per_s']:>8.0f} {r['prefill_ms']:>10.1f} {r['peak_GiB']:>8.2f} "
              f"{llama if llama is not None else '-':>12}")
    print("compiled vs eager, relative logit error:",
          {k: v for k, v in report["results"].items() if k.endswith("logit_error")})


if __name__ == "__main__":
    main()
