"""fla-core's gated delta rule against the package's PyTorch reference on a GPU (needs `pip install m2rnn[fla]`).

    PYTHONPATH=. python benchmarks/check_gdn_fla.py

At the paper's GDN head shape (H=2, K=256, V=512; B=2, S=1024, bf16 q, k, v and beta, float32 log decay and state),
with an initial state, q/k l2-normalised in the kernels, and once with packed sequences (cu_seqlens): fla's chunked
kernel (training, prefill) and fused recurrent kernel (decoding, up to 64 tokens) against the reference loop in
float64 on the same inputs. Output and final state within FORWARD_BOUND (relative, Frobenius), the gradients of every
input within BACKWARD_BOUND. Where fla refuses its backward on this GPU and Triton (Hopper, 3.4.0 <= Triton < 3.7.1,
no tilelang: fla issue #640), that is printed and checked instead: backend="fla" raises, "auto" falls back to the
reference with a warning. Exits non-zero if any check fails.
"""

import sys
import warnings

import torch
import torch.nn.functional as F

from modeling_m2rnn.kernels.gated_delta_rule import fla_is_available, gated_delta_rule
from modeling_m2rnn.kernels.gated_delta_rule.fla import fla_backward_refusal

FORWARD_BOUND = 2e-2    # bf16 inputs; fla keeps its chunk-local products (w, u, A) in bf16
BACKWARD_BOUND = 5e-2


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def inputs(batch=2, seq_len=1024, heads=2, key_dim=256, value_dim=512, seed=0) -> dict:
    generator = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device="cuda")

    return {
        "q": randn(batch, seq_len, heads, key_dim).bfloat16(),
        "k": randn(batch, seq_len, heads, key_dim).bfloat16(),
        "v": randn(batch, seq_len, heads, value_dim).bfloat16(),
        "g": F.logsigmoid(randn(batch, seq_len, heads) + 3),                  # decays mostly near 1, as trained
        "beta": torch.sigmoid(randn(batch, seq_len, heads)).bfloat16(),
        "initial_state": randn(batch, heads, key_dim, value_dim) * 0.1,
    }


def run(backend: str, tensors: dict, cu_seqlens=None, grad: bool = False):
    tensors = {name: x.detach().clone().requires_grad_(grad) for name, x in tensors.items()}
    o, state = gated_delta_rule(**tensors, cu_seqlens=cu_seqlens, qk_l2norm=True, backend=backend)
    grads = {}
    if grad:
        weights = torch.randn(o.shape, generator=torch.Generator("cuda").manual_seed(1), device="cuda")
        ((o.float() * weights).sum() + state.sum()).backward()
        grads = {name: x.grad for name, x in tensors.items()}
    return o, state, grads


def float64(tensors: dict) -> dict:
    return {name: x.double() for name, x in tensors.items()}


def check(label: str, error: float, bound: float, failures: list) -> None:
    ok = error <= bound
    print(f"  {label:<34} relative error {error:.2e}  (bound {bound:.0e})  {'ok' if ok else 'FAIL'}")
    if not ok:
        failures.append(label)


def main() -> int:
    if not torch.cuda.is_available() or not fla_is_available():
        print("needs a CUDA GPU and fla-core (pip install m2rnn[fla])")
        return 1
    import fla
    import triton

    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}: torch {torch.__version__}, triton {triton.__version__}, "
          f"fla-core {getattr(fla, '__version__', '?')}")
    refusal = fla_backward_refusal(device)
    print(f"fla backward: {refusal or 'runs'}")
    failures = []

    base = inputs()
    packed = {name: x.reshape(1, -1, *x.shape[2:]) if name != "initial_state" else x for name, x in base.items()}
    packed["initial_state"] = torch.cat([base["initial_state"], base["initial_state"].flip(0)])   # 4 sequences
    cu_seqlens = torch.tensor([0, 300, 1024, 1500, 2048], dtype=torch.int32, device=device)
    for label, tensors, bounds in (("rows", base, None), ("packed", packed, cu_seqlens)):
        print(f"{label}: chunked kernel, {tuple(tensors['v'].shape)}")
        o, state, _ = run("fla", tensors, bounds)
        o_ref, state_ref, _ = run("torch", float64(tensors), bounds)
        check("output", relative_error(o, o_ref), FORWARD_BOUND, failures)
        check("final state", relative_error(state, state_ref), FORWARD_BOUND, failures)

    decode = {name: x[:, :48] if name != "initial_state" else x for name, x in base.items()}
    print("decoding: fused recurrent kernel, 48 tokens without gradients")
    with torch.no_grad():
        o, state, _ = run("fla", decode)
        o_ref, state_ref, _ = run("torch", float64(decode))
    check("output", relative_error(o, o_ref), FORWARD_BOUND, failures)
    check("final state", relative_error(state, state_ref), FORWARD_BOUND, failures)

    short = {name: x[:, :256] if name != "initial_state" else x for name, x in base.items()}
    print("backward: chunked kernel, S=256")
    if refusal is None:
        _, _, grads = run("fla", short, grad=True)
        _, _, grads_ref = run("torch", float64(short), grad=True)
        for name in grads:
            check(f"d{name}", relative_error(grads[name], grads_ref[name]), BACKWARD_BOUND, failures)
    else:
        try:
            run("fla", short, grad=True)
            print("  backend='fla': the backward ran although fla was expected to refuse  FAIL")
            failures.append("refusal")
        except RuntimeError as error:
            print(f"  backend='fla' raises, as expected: {str(error)[:160]}")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run("auto", {name: x[:, :32] if name != "initial_state" else x for name, x in short.items()}, grad=True)
        fell_back = any("running the PyTorch reference" in str(w.message) for w in caught)
        print(f"  backend='auto' falls back to the reference with a warning: {'ok' if fell_back else 'FAIL'}")
        if not fell_back:
            failures.append("fallback")

    print("all checks passed" if not failures else f"FAILED: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
