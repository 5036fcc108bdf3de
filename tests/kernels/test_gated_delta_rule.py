"""The gated delta rule op: its reference against a scalar loop, gradients, packing, validation, backends."""

import importlib
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from modeling_m2rnn.kernels.gated_delta_rule import fla_is_available, gated_delta_rule


def random_inputs(batch=2, seq_len=7, heads=3, key_dim=5, value_dim=4, dtype=torch.float64, seed=0, state=True):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    q, k = randn(batch, seq_len, heads, key_dim), randn(batch, seq_len, heads, key_dim)
    v = randn(batch, seq_len, heads, value_dim)
    g = F.logsigmoid(randn(batch, seq_len, heads))              # log decay < 0
    beta = torch.sigmoid(randn(batch, seq_len, heads))
    initial_state = randn(batch, heads, key_dim, value_dim) if state else None
    low = {"q": q, "k": k, "v": v, "beta": beta}
    return {**{name: x.to(dtype) for name, x in low.items()}, "g": g, "initial_state": initial_state}


def scalar_loop(q, k, v, g, beta, scale, initial_state, qk_l2norm):
    """The recurrence element by element in float64, written from the definition without tensor algebra:
    S ← exp(g) S; e_j = v_j − Σ_i S_ij k_i; S_ij ← S_ij + β k_i e_j; o_j = Σ_i S_ij q_i · scale."""
    batch, seq_len, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    out = torch.zeros(batch, seq_len, heads, value_dim, dtype=torch.float64)
    final = torch.zeros(batch, heads, key_dim, value_dim, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            S = [[float(initial_state[b, h, i, j]) if initial_state is not None else 0.0 for j in range(value_dim)]
                 for i in range(key_dim)]
            for t in range(seq_len):
                qs, ks = [float(x) for x in q[b, t, h]], [float(x) for x in k[b, t, h]]
                if qk_l2norm:
                    qs = [x / math.sqrt(sum(y * y for y in qs) + 1e-6) for x in qs]
                    ks = [x / math.sqrt(sum(y * y for y in ks) + 1e-6) for x in ks]
                decay, strength = math.exp(float(g[b, t, h])), float(beta[b, t, h])
                S = [[decay * S[i][j] for j in range(value_dim)] for i in range(key_dim)]
                error = [float(v[b, t, h, j]) - sum(S[i][j] * ks[i] for i in range(key_dim)) for j in range(value_dim)]
                S = [[S[i][j] + strength * ks[i] * error[j] for j in range(value_dim)] for i in range(key_dim)]
                for j in range(value_dim):
                    out[b, t, h, j] = scale * sum(S[i][j] * qs[i] for i in range(key_dim))
            final[b, h] = torch.tensor(S, dtype=torch.float64)
    return out, final


@pytest.mark.parametrize("qk_l2norm", [False, True], ids=["raw_qk", "l2norm_qk"])
@pytest.mark.parametrize("state", [False, True], ids=["zero_start", "initial_state"])
def test_reference_is_the_scalar_recurrence(qk_l2norm, state):
    inputs = random_inputs(state=state, seed=int(qk_l2norm) + 2 * int(state))
    o, final_state = gated_delta_rule(**inputs, qk_l2norm=qk_l2norm, backend="torch")
    expected_o, expected_state = scalar_loop(**inputs, scale=5 ** -0.5, qk_l2norm=qk_l2norm)
    assert o.dtype == final_state.dtype == torch.float64
    assert (o - expected_o).abs().max() <= 1e-12 * expected_o.abs().max()
    assert (final_state - expected_state).abs().max() <= 1e-12 * expected_state.abs().max()


def test_an_explicit_scale_multiplies_the_queries():
    inputs = random_inputs(seed=4)
    o, _ = gated_delta_rule(**inputs, scale=0.3, backend="torch")
    expected, _ = scalar_loop(**inputs, scale=0.3, qk_l2norm=False)
    assert (o - expected).abs().max() <= 1e-12 * expected.abs().max()


def test_gradients_match_finite_differences_in_every_input():
    inputs = random_inputs(batch=1, seq_len=4, heads=2, key_dim=3, value_dim=2, seed=5)
    names = list(inputs)

    def run(*tensors):
        return gated_delta_rule(**dict(zip(names, tensors)), qk_l2norm=True, backend="torch")

    tensors = [x.clone().requires_grad_() for x in inputs.values()]
    assert torch.autograd.gradcheck(run, tensors, eps=1e-6, atol=1e-8)


def test_packed_sequences_equal_the_sequences_run_alone():
    lengths = [3, 1, 5]
    pieces = [random_inputs(batch=1, seq_len=n, seed=10 + n) for n in lengths]
    packed = {name: torch.cat([p[name] for p in pieces], dim=0 if name == "initial_state" else 1) for name in pieces[0]}
    cu_seqlens = torch.tensor([0, 3, 4, 9], dtype=torch.int32)
    o, final_states = gated_delta_rule(**packed, cu_seqlens=cu_seqlens, qk_l2norm=True, backend="torch")
    for i, piece in enumerate(pieces):
        o_alone, state_alone = gated_delta_rule(**piece, qk_l2norm=True, backend="torch")
        assert torch.equal(o[:, cu_seqlens[i] : cu_seqlens[i + 1]], o_alone)
        assert torch.equal(final_states[i : i + 1], state_alone)


def test_low_precision_inputs_give_their_dtype_and_a_float32_state():
    inputs = random_inputs(dtype=torch.bfloat16, state=False, seed=6)
    inputs["g"] = inputs["g"].float()
    o, final_state = gated_delta_rule(**inputs, backend="auto")   # no CUDA here: the reference
    reference, _ = gated_delta_rule(**{n: x.double() for n, x in inputs.items() if x is not None}, backend="torch")
    assert o.dtype == torch.bfloat16 and final_state.dtype == torch.float32
    assert (o.double() - reference).abs().max() <= 2e-2 * reference.abs().max()


def test_a_decay_of_zero_and_a_beta_of_zero_leave_the_state_as_it_was():
    inputs = random_inputs(batch=1, seq_len=5, seed=7)
    inputs["g"][:, 2:] = 0.0
    inputs["beta"][:, 2:] = 0.0
    _, state_after_two = gated_delta_rule(**{n: (x[:, :2] if n != "initial_state" else x) for n, x in inputs.items()},
                                          backend="torch")
    _, state_after_five = gated_delta_rule(**inputs, backend="torch")
    assert torch.equal(state_after_two, state_after_five)


@pytest.mark.parametrize(
    "change, rule",
    [
        (lambda x: x.update(q=x["q"][..., :-1]), "`k` must have the shape of `q`"),
        (lambda x: x.update(v=x["v"][:, :, :1]), "`v` must be"),
        (lambda x: x.update(g=x["g"].to(torch.bfloat16)), "`g` must be float32"),
        (lambda x: x.update(beta=x["beta"][:, :-1]), "`beta` must be"),
        (lambda x: x.update(v=x["v"].float()), "must share one dtype"),
        (lambda x: x.update(initial_state=x["initial_state"][:1]), "`initial_state` must have shape"),
        (lambda x: x.update(cu_seqlens=torch.tensor([0, 7])), "B must be 1"),
        (lambda x: x.update(scale=0.0), "`scale` must be a positive"),
        (lambda x: x.update(backend="cuda"), "`backend` must be one of"),
    ],
)
def test_bad_inputs_get_a_value_error_naming_the_rule(change, rule):
    inputs = random_inputs(seed=8)
    change(inputs)
    with pytest.raises(ValueError, match=rule):
        gated_delta_rule(**inputs)


def test_packed_bounds_must_cover_the_sequence():
    inputs = random_inputs(batch=1, seed=9, state=False)
    with pytest.raises(ValueError, match="must rise from 0 to S=7"):
        gated_delta_rule(**inputs, cu_seqlens=torch.tensor([0, 5, 6]))


@pytest.mark.skipif(fla_is_available(), reason="fla-core is installed")
def test_the_fla_backend_without_fla_core_says_how_to_install_it():
    with pytest.raises(ValueError, match=r"pip install m2rnn\[fla\]"):
        gated_delta_rule(**random_inputs(seed=11), backend="fla")


def test_auto_leaves_fla_for_the_reference_only_where_flas_backward_refuses_and_says_why(monkeypatch):
    op = importlib.import_module("modeling_m2rnn.kernels.gated_delta_rule")   # the package, not the function

    fla_calls = []
    monkeypatch.setattr(op, "uses_fla", lambda backend, x: True)   # as for CUDA tensors with fla-core installed
    monkeypatch.setattr(op, "fla_backward_refusal", lambda device: "refused on this GPU")
    monkeypatch.setattr(
        op, "gated_delta_rule_fla", lambda *args: fla_calls.append(1) or op.gated_delta_rule_reference(*args)
    )
    inputs = random_inputs(seed=12)
    op.gated_delta_rule(**inputs)                                    # no gradients: fla's forward is fine
    assert fla_calls == [1]
    inputs["q"].requires_grad_()
    with pytest.warns(UserWarning, match="refused on this GPU; running the PyTorch reference"):
        op.gated_delta_rule(**inputs)
    assert fla_calls == [1]


def test_flas_backward_is_refused_only_on_hopper_with_an_affected_triton_and_no_usable_tilelang(monkeypatch):
    fla_backend = importlib.import_module("modeling_m2rnn.kernels.gated_delta_rule.fla")
    refusal = fla_backend.fla_backward_refusal.__wrapped__   # uncached: the cases below change what it reads
    triton = pytest.importorskip("triton")
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(fla_backend, "fla_tilelang_is_usable", lambda: False)
    assert "fla issue #640" in refusal(cuda)
    assert refusal(torch.device("cpu")) is None

    monkeypatch.setattr(fla_backend, "fla_tilelang_is_usable", lambda: True)
    assert refusal(cuda) is None
    monkeypatch.setattr(fla_backend, "fla_tilelang_is_usable", lambda: False)
    monkeypatch.setattr(triton, "__version__", "3.7.1")
    assert refusal(cuda) is None
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert refusal(cuda) is None


@pytest.mark.parametrize("tilelang, nvcc, switch, usable", [
    (True, True, None, True),
    (True, True, "1", True),
    (True, True, "0", False),     # FLA_TILELANG=0 switches fla's TileLang backend off
    (True, False, None, False),   # TileLang compiles with nvcc
    (False, True, None, False),
])
def test_tilelang_counts_as_usable_by_flas_own_tests(monkeypatch, tilelang, nvcc, switch, usable):
    fla_backend = importlib.import_module("modeling_m2rnn.kernels.gated_delta_rule.fla")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: (object() if tilelang else None) if name == "tilelang"
                        else real_find_spec(name, *args))
    fla_env = type(importlib)("fla.utils.env")   # fla's module that holds its nvcc test, stubbed
    fla_env.has_usable_nvcc = lambda: nvcc
    for name, module in (("fla", type(importlib)("fla")), ("fla.utils", type(importlib)("fla.utils")),
                         ("fla.utils.env", fla_env)):
        monkeypatch.setitem(sys.modules, name, module)
    if switch is None:
        monkeypatch.delenv("FLA_TILELANG", raising=False)
    else:
        monkeypatch.setenv("FLA_TILELANG", switch)
    assert fla_backend.fla_tilelang_is_usable() is usable



def test_auto_gives_a_compiled_decode_step_the_reference_and_leaves_training_and_prefill_to_fla():
    """fla's Python wrapper breaks a graph, which generate's compiled decoding (fullgraph) refuses: inside a compiled
    graph, a no-gradient call of at most FUSED_RECURRENT_MAX_TOKENS tokens runs the reference instead."""
    op = importlib.import_module("modeling_m2rnn.kernels.gated_delta_rule")
    torch._dynamo.reset()
    decide = torch.compile(op.compiled_decode_step, fullgraph=True, backend="eager")
    one_token, long_prompt = torch.zeros(1, 1, 2, 4), torch.zeros(1, op.FUSED_RECURRENT_MAX_TOKENS + 1, 2, 4)
    with torch.no_grad():
        assert decide(one_token) is True
        assert decide(long_prompt) is False
        assert op.compiled_decode_step(one_token) is False   # not compiling: fla's fused recurrent kernel
    assert decide(one_token) is False                        # gradients: a compiled training step keeps fla
