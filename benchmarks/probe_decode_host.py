"""Where the time of a compiled batch-1 decode token goes: host or GPU, measurement after measurement in one process.

    PYTHONPATH=. python benchmarks/probe_decode_host.py --model hybrid-m2rnn-400m [--rounds 8] [--pin-cpus 0 4 8]

generate waits for the GPU at every token, so a token costs the host's work plus the GPU's. This wraps generate's
compiled decode step (what `model.get_compiled_call` returns) and records, per token:
- `host_in_call`: host time inside the compiled call (guards, CUDA-graph bookkeeping, the launch);
- `gpu_span`: GPU time from an event recorded just before the call to one just after it;
- `gpu_idle_before_step`: GPU time from the previous token's end to that first event, while generate prepares the
  next step on the host;
- `interval`: the token's whole time (the median of each), `slowest_token` the longest (where a new cache's step
  is captured); `cpu`: the core the main thread ran on last.
Rounds repeat the measurement; `--pin-cpus` repeats it with the main thread on each core given; then as many rounds
as the first run transformers' own compiled call, whose CUDA graphs are inductor's (cudagraph trees, with dynamo's
guards evaluated before every token) instead of the model's `DecodeGraphs`. Last, the GPU kernel time per decode token
(torch.profiler, gaps excluded) and the compiled-vs-eager logit error at batch 1. Results go to $OUT (or
benchmarks/results) as JSON.
"""

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from bench_generate import TokenClock, compiled_logit_error, decode_compile_config, static_compiled
from transformers import PreTrainedModel, StoppingCriteriaList

from modeling_m2rnn import M2RNNConfig, M2RNNForCausalLM
from modeling_m2rnn.generation.decode_graphs import CapturedStep


def _median(values) -> float:
    return round(statistics.median(values), 3)


def current_cpu() -> int:
    """The core this thread last ran on (field 39 of /proc/thread-self/stat)."""
    return int(Path("/proc/thread-self/stat").read_text().rsplit(")", 1)[1].split()[36])


class StepRecorder:
    """Stands in for generate's compiled step: calls it between two CUDA events and times the host's part."""

    def __init__(self, get_compiled_call):
        self.get_compiled_call = get_compiled_call
        self.compiled_step = None
        self.calls = []   # (host start, host end, start event, end event)

    def install(self, model) -> None:
        """Record the steps of `model.generate`, made by `get_compiled_call` (None: the model's own)."""
        get_compiled_call = self.get_compiled_call or model.get_compiled_call

        def recorded(compile_config):
            self.compiled_step = get_compiled_call(compile_config)
            return self

        model.get_compiled_call = recorded

    def __call__(self, *args, **kwargs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        host_start = time.perf_counter()
        start.record()
        out = self.compiled_step(*args, **kwargs)
        end.record()
        self.calls.append((host_start, time.perf_counter(), start, end))
        return out


def probe(model, recorder: StepRecorder, prompt, options: dict, label: str, new_tokens: int = 128) -> dict:
    recorder.calls.clear()
    clock = TokenClock(prompt.shape[0])
    model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                   stopping_criteria=StoppingCriteriaList([clock]), **options)
    intervals = clock.intervals_ms().tolist()
    calls = recorder.calls   # call k is the step after token k (the prefill's token is token 0)
    return dict(
        label=label,
        interval=_median(intervals),
        slowest_token=round(max(intervals), 2),   # where a step is captured (or recorded) for a new cache
        gpu_span=_median([start.elapsed_time(end) for _, _, start, end in calls]),
        gpu_idle_before_step=_median([clock.events[k].elapsed_time(start) for k, (_, _, start, _) in enumerate(calls)]),
        host_in_call=_median([1e3 * (host_end - host_start) for host_start, host_end, _, _ in calls]),
        cpu=current_cpu(),
    )


def decode_kernel_time(model, prompt, options: dict) -> dict:
    """GPU kernel time and kernel count per decode token: two profiled generates, 9 and 41 tokens, differenced so
    that the prefill drops out."""
    def totals(tokens):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
            model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, **options)
        kernels = [e for e in profiler.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        return sum(e.device_time for e in kernels), len(kernels)

    (short_us, short_count), (long_us, long_count) = totals(9), totals(41)
    return dict(decode_kernel_us_per_token=round((long_us - short_us) / 32, 1),
                decode_kernels_per_token=round((long_count - short_count) / 32, 1))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="hybrid-m2rnn-400m")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pin-cpus", nargs="*", type=int, default=[])
    parser.add_argument("--compile-mode", default="reduce-overhead", choices=["reduce-overhead", "max-autotune"])
    parser.add_argument("--output", type=Path, default=Path(os.environ.get("OUT", "benchmarks/results")))
    args = parser.parse_args()

    torch.manual_seed(0)
    model = M2RNNForCausalLM(M2RNNConfig.from_preset(args.model)).to("cuda", torch.bfloat16).eval()
    compile_config = decode_compile_config(args.compile_mode)
    options = static_compiled(16512, compile_config)
    prompt = torch.randint(1, model.config.vocab_size, (1, args.prompt), device="cuda")
    model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False, **options)   # compiles
    recorder = StepRecorder(None)
    recorder.install(model)

    rows = [probe(model, recorder, prompt, options, f"round {i}") for i in range(args.rounds)]
    all_cpus = os.sched_getaffinity(0)
    for cpu in args.pin_cpus:
        os.sched_setaffinity(0, {cpu})   # this thread only
        rows.append(probe(model, recorder, prompt, options, f"pinned to cpu {cpu}"))
    os.sched_setaffinity(0, all_cpus)
    graphs = getattr(model, "_decode_graphs", None)
    captured = sum(isinstance(step, CapturedStep) for step in graphs.steps.values()) if graphs else 0

    inductor_graphs = StepRecorder(PreTrainedModel.get_compiled_call.__get__(model))
    inductor_graphs.install(model)
    model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False, **options)   # compiles
    rows += [probe(model, inductor_graphs, prompt, options, f"inductor's CUDA graphs, round {i}")
             for i in range(args.rounds)]
    del model.get_compiled_call

    rows.append(dict(label="GPU kernels", graphs_captured=captured,
                     **decode_kernel_time(model, prompt[:, :64], options),
                     compiled_vs_eager_logit_error=compiled_logit_error(model, 16512, compile_config, batch=1)))
    for row in rows:
        print(json.dumps(row), flush=True)
    args.output.mkdir(parents=True, exist_ok=True)
    report = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
                  model=args.model, prompt=args.prompt, compile_mode=args.compile_mode, rows=rows)
    (args.output / f"probe_decode_host_{args.model}.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
