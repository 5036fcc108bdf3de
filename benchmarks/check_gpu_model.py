"""Model-level checks of the Triton backend on a GPU: a training step on Triton matches the PyTorch reference.

    PYTHONPATH=. python benchmarks/check_gpu_model.py

A small hybrid (M2RNN layers with the paper's head sharing, Nq = Nk = 1, and one attention layer) takes one
training step under bf16 autocast with each scan backend, on padded rows and on packed rows (cu_seqlens). The
loss and every parameter gradient of the Triton run are compared with the reference run by relative error
(bound 3e-2: bf16 activations, the kernels' fp16 state products and approximate tanh). A gradient that is a
small sum of large cancelling terms can differ by more between two bf16 runs; it also passes when the Triton
run is no farther from a float32 run of the reference backend (no autocast, the truth here) than twice the
reference backend's own bf16 run. The Triton run is made on both scan kernel paths, the Triton twins and the Gluon
kernels (M2RNN_SCAN_KERNELS=triton and =gluon; see check_scan_gpu.py). Prints the worst gradients and exits non-zero
if any check fails.

First, the short-conv kernels alone at the 400M layer's shape (B=8, S=4096, C=1472, bf16, with and without packed
sequences) against the layer's PyTorch conv in float64: out, dx and dweight within CONV_BOUND; and the gated-norm
kernels (B=8, S=4096, N=84, V=16, bf16 y, v, g) against the layer's PyTorch code in float64, within CONV_BOUND.
"""

import sys

import torch
from check_scan_gpu import PATHS, kernels  # benchmarks/, the script's folder

from modeling_m2rnn import M2RNNConfig, M2RNNForCausalLM
from modeling_m2rnn.kernels import causal_conv1d, causal_conv1d_silu, gated_rms_norm, gated_rms_norm_reference

BOUND = 3e-2
CONV_BOUND = 1e-2   # bf16 inputs, float32 products and sums, bf16 out and dx (also the gated norm's bound)


def small_hybrid(backend: str) -> M2RNNForCausalLM:
    torch.manual_seed(0)
    config = M2RNNConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        layer_types=["m2rnn", "m2rnn", "full_attention", "m2rnn"], num_attention_heads=4,
        m2rnn_k_head_dim=64, m2rnn_v_head_dim=16, m2rnn_num_q_heads=1, m2rnn_num_k_heads=1,
        m2rnn_num_v_heads=16, m2rnn_num_f_heads=16, m2rnn_num_g_heads=16, m2rnn_num_weight_heads=16,
        m2rnn_kernel_backend=backend, pad_token_id=0,
    )
    return M2RNNForCausalLM(config).cuda().train()


def training_step(backend: str, batch: dict, bf16: bool = True) -> tuple[float, dict]:
    model = small_hybrid(backend)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        loss = model(**batch).loss
    loss.backward()
    return loss.item(), {name: p.grad.float() for name, p in model.named_parameters() if p.grad is not None}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def batches() -> dict:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 512, (4, 300), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :37] = 0   # a left-padded row
    padded = dict(input_ids=ids.cuda(), attention_mask=mask.cuda(), labels=ids.masked_fill(mask == 0, -100).cuda())
    rows = [[1, 120, 57, 122], [300]]   # sequences packed into rows, positions restarting at each
    position_ids = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in rows])
    packed_ids = torch.randint(1, 512, (2, 300), generator=generator)
    packed = dict(input_ids=packed_ids.cuda(), position_ids=position_ids.cuda(), labels=packed_ids.cuda())
    return {"padded": padded, "packed": packed}


def check_short_conv() -> int:
    """The conv kernels against float64 at the 400M layer's shape; returns the number of failed cases."""
    generator = torch.Generator().manual_seed(2)
    batch, seq_len, channels, kernel_size = 8, 4096, 1472, 4
    x = torch.randn(batch, seq_len, channels, generator=generator).bfloat16()
    weight = torch.randn(channels, kernel_size, generator=generator) / kernel_size
    dout = torch.randn(batch, seq_len, channels, generator=generator).bfloat16()
    starts = torch.rand(batch, seq_len, generator=generator) < 1e-3   # sequences of ~1000 tokens, some of length 1
    starts[0, 100:103] = True
    failures = 0
    for name, sequence_ids in (("rows", None), ("packed", starts.long().cumsum(1).cuda())):
        x64, weight64 = x.cuda().double().requires_grad_(), weight.cuda().double().requires_grad_()
        reference = torch.nn.functional.silu(causal_conv1d(x64, weight64, sequence_ids=sequence_ids)[0])
        expected = (reference, *torch.autograd.grad(reference, (x64, weight64), dout.cuda().double()))
        x_dev, weight_dev = x.cuda().requires_grad_(), weight.cuda().requires_grad_()
        (out,), _ = causal_conv1d_silu(x_dev, weight_dev, sequence_ids=sequence_ids, backend="triton")
        measured = (out, *torch.autograd.grad(out, (x_dev, weight_dev), dout.cuda()))
        errors = [relative_error(a.double(), b) for a, b in zip(measured, expected)]
        failures += max(errors) >= CONV_BOUND
        print(f"short conv [{name}] vs float64: out {errors[0]:.1e}, dx {errors[1]:.1e}, dweight {errors[2]:.1e}; "
              f"{'ok' if max(errors) < CONV_BOUND else 'FAIL'}", flush=True)
    return failures


def check_gated_norm() -> int:
    """The gated-norm kernels against float64 at the 400M layer's shape under bf16 autocast's dtypes (bf16 out);
    returns 1 on failure."""
    generator = torch.Generator().manual_seed(3)
    shape = (8, 4096, 84, 16)
    tensors = dict(y=torch.randn(*shape, generator=generator).bfloat16(),
                   g=torch.randn(*shape, generator=generator).bfloat16(),
                   weight=1 + 0.3 * torch.randn(84 * 16, generator=generator),
                   v=torch.randn(*shape, generator=generator).bfloat16(), D=torch.randn(84, 16, generator=generator))
    dout = torch.randn(8, 4096, 84 * 16, generator=generator).bfloat16().cuda()
    leaves64 = {name: x.cuda().double().requires_grad_() for name, x in tensors.items()}
    reference = gated_rms_norm_reference(eps=1e-6, **leaves64)
    expected = (reference, *torch.autograd.grad(reference, list(leaves64.values()), dout.double()))
    del leaves64, reference
    leaves = {name: x.cuda().requires_grad_() for name, x in tensors.items()}
    out = gated_rms_norm(eps=1e-6, out_dtype=torch.bfloat16, backend="triton", **leaves)
    measured = (out, *torch.autograd.grad(out, list(leaves.values()), dout))
    errors = dict(zip(["out", *(f"d{name}" for name in leaves)],
                      (relative_error(a.double(), b) for a, b in zip(measured, expected))))
    failed = max(errors.values()) >= CONV_BOUND
    print("gated norm vs float64: " + ", ".join(f"{name} {e:.1e}" for name, e in errors.items())
          + f"; {'FAIL' if failed else 'ok'}", flush=True)
    return int(failed)


def main() -> int:
    failures = check_short_conv() + check_gated_norm()
    for name, batch in batches().items():
        ref_loss, ref_grads = training_step("torch", batch)
        _, truth = training_step("torch", batch, bf16=False)
        for path in PATHS:
            with kernels(path):
                loss, grads = training_step("triton", batch)
            loss_error = abs(loss - ref_loss) / abs(ref_loss)
            failed = [] if loss_error < BOUND and set(grads) == set(ref_grads) else ["loss"]
            rows = []
            for n, ref in ref_grads.items():
                mutual, triton_error, torch_error = (relative_error(grads[n], ref), relative_error(grads[n], truth[n]),
                                                     relative_error(ref, truth[n]))
                if not (mutual < BOUND or triton_error <= 2 * torch_error):
                    failed.append(n)
                rows.append((mutual, n, triton_error, torch_error))
            failures += bool(failed)
            print(f"train step [{name}, {path} kernels] triton vs torch: loss {loss:.5f} vs {ref_loss:.5f} "
                  f"(rel {loss_error:.1e}); {'ok' if not failed else 'FAIL: ' + ', '.join(failed)}", flush=True)
            for mutual, n, triton_error, torch_error in sorted(rows, reverse=True)[:5]:
                print(f"  {n}: triton vs torch {mutual:.1e}; "
                      f"vs float32: triton {triton_error:.1e}, torch {torch_error:.1e}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
