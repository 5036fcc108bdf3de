"""Forward and forward+backward time and peak memory of one token-mixing layer of each kind at the paper's 400M shape
(run from the repo root: PYTHONPATH=. python benchmarks/bench_layers.py [--shape 8x4096]).

Each mixer of the 400M presets (M2RNN, Gated DeltaNet, attention) runs on (B, S, 1024) activations under bf16 autocast
with float32 weights, as in training: forward without gradients, forward+backward (gradients of the input and every
parameter), as triton.testing.do_bench medians on fresh random inputs, and the peak memory each allocates above its
inputs. The kernels are those the layer picks by default on the GPU: the Triton scan for M2RNN, fla-core's chunked
kernel for Gated DeltaNet (`pip install m2rnn[fla]`; `benchmarks/check_gdn_fla.py` checks it against the reference
first), SDPA for attention. Where fla refuses its backward on this GPU and Triton, the Gated DeltaNet row says so and
times the forward only. JSON goes to benchmarks/results/bench_layers.json (and $OUT when set).
"""

import argparse
import json

import torch
import triton
from bench_scan import peak_extra_gib  # (benchmarks/ is the script's folder, on sys.path)
from run_info import run_info, write_results
from transformers import AutoModelForCausalLM

from modeling_m2rnn import M2RNNConfig
from modeling_m2rnn.kernels.gated_delta_rule.fla import fla_backward_refusal, fla_is_available

LAYERS = {   # name -> (the 400M preset it is taken from, its mixer type)
    "m2rnn": ("m2rnn-400m", "m2rnn"),
    "gated_deltanet": ("hybrid-gated-deltanet-400m", "gated_deltanet"),
    "attention": ("hybrid-m2rnn-400m", "attention"),
}


def build_mixer(preset: str, mixer_type: str) -> tuple[torch.nn.Module, int]:
    """The preset's first layer of that mixer type, alone in a one-layer model on the GPU; and the hidden size."""
    index = M2RNNConfig.from_preset(preset).mixer_types.index(mixer_type)
    config = M2RNNConfig.from_preset(preset, num_hidden_layers=index + 1)
    with torch.device("cuda"):
        layer = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").model.layers[index]
    return (layer.self_attn if mixer_type == "attention" else getattr(layer, mixer_type)), config.hidden_size


def measure(mixer, batch: int, seq_len: int, hidden: int, backward: bool) -> dict:
    x = torch.randn(batch, seq_len, hidden, device="cuda", requires_grad=True)
    dy = torch.randn(batch, seq_len, hidden, device="cuda", dtype=torch.bfloat16)
    leaves = [x, *mixer.parameters()]

    def call():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = mixer(x)
        return out[0] if isinstance(out, tuple) else out   # attention also returns its weights

    def forward():
        with torch.no_grad():
            return call()

    def forward_backward():
        return torch.autograd.grad(call(), leaves, dy)

    bench = dict(warmup=25, rep=200, return_mode="median")
    result = dict(fwd_ms=triton.testing.do_bench(forward, **bench), fwd_peak_gib=peak_extra_gib(forward))
    if backward:
        result.update(fwdbwd_ms=triton.testing.do_bench(forward_backward, **bench),
                      fwdbwd_peak_gib=peak_extra_gib(forward_backward))
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="8x4096", help="BxS (default 8x4096)")
    args = parser.parse_args()
    batch, seq_len = (int(n) for n in args.shape.split("x"))
    if not fla_is_available():
        parser.error("the Gated DeltaNet row needs fla-core: pip install m2rnn[fla]")

    report = dict(**run_info(), B=batch, S=seq_len, layers={})
    refusal = fla_backward_refusal(torch.device("cuda"))
    header = f"{'layer':<16}{'fwd ms':>10}{'fwd+bwd ms':>12}{'fwd GiB':>10}{'fwd+bwd GiB':>13}"
    lines = [f"{header}   B={batch}, S={seq_len}, {report['gpu']}"]
    for name, (preset, mixer_type) in LAYERS.items():
        torch.manual_seed(0)
        mixer, hidden = build_mixer(preset, mixer_type)
        backward = not (mixer_type == "gated_deltanet" and refusal)
        result = measure(mixer, batch, seq_len, hidden, backward)
        if not backward:
            result["fwdbwd"] = refusal
        report["layers"][name] = result
        fwdbwd = (f"{result['fwdbwd_ms']:>12.3f}" if backward else f"{'-':>12}")
        fwdbwd_gib = (f"{result['fwdbwd_peak_gib']:>13.2f}" if backward else f"{'-':>13}")
        lines.append(f"{name:<16}{result['fwd_ms']:>10.3f}{fwdbwd}{result['fwd_peak_gib']:>10.2f}{fwdbwd_gib}")
        print(lines[-1], flush=True)
        del mixer
        torch.cuda.empty_cache()
    if refusal:
        lines.append(f"gated_deltanet fwd+bwd not timed: {refusal}")
    print("\n".join(lines))

    write_results("bench_layers.json", json.dumps({**report, "table": lines}, indent=1))


if __name__ == "__main__":
    main()
