"""The PyTorch reference of the recurrence op against its math (docs/design.md, "The recurrence"), written out per
head and step."""

import pytest
import torch

from modeling_m2rnn.kernels import m2rnn_scan

from helpers import relative_error


def random_inputs(batch, seq_len, heads, key_dim, value_dim, dtype=torch.float64, generator=None):
    """heads: (Nq, Nk, Nv, Nf, Nw). f is drawn in (0.05, 1) so that every step mixes old and new state."""
    num_q, num_k, num_v, num_f, num_w = heads
    gen = dict(generator=generator, dtype=dtype)
    q = torch.randn(batch, seq_len, num_q, key_dim, **gen)
    k = torch.randn(batch, seq_len, num_k, key_dim, **gen)
    v = torch.randn(batch, seq_len, num_v, value_dim, **gen)
    W = torch.randn(num_w, value_dim, value_dim, **gen) / value_dim**0.5
    f = 0.05 + 0.95 * torch.rand(batch, seq_len, num_f, generator=generator, dtype=torch.float64)
    return q, k, v, W, f.to(torch.float32 if dtype != torch.float64 else torch.float64)


def naive_scan(q, k, v, W, f, initial_state=None):
    """Scalar loops over batch, head and time: the recurrence of docs/design.md read literally, in float64."""
    batch, seq_len, _, key_dim = q.shape
    value_dim = v.shape[-1]
    counts = [q.shape[2], k.shape[2], v.shape[2], f.shape[2], W.shape[0]]
    num_heads = max(counts)
    group = [num_heads // c for c in counts]
    y = torch.zeros(batch, seq_len, num_heads, value_dim, dtype=torch.float64)
    final = torch.zeros(batch, num_heads, key_dim, value_dim, dtype=torch.float64)
    for b in range(batch):
        for n in range(num_heads):
            H = torch.zeros(key_dim, value_dim, dtype=torch.float64)
            if initial_state is not None:
                H = initial_state[b, n].double().clone()
            W_n = W[n // group[4]].double()
            for t in range(seq_len):
                q_t, k_t = q[b, t, n // group[0]].double(), k[b, t, n // group[1]].double()
                v_t, f_t = v[b, t, n // group[2]].double(), f[b, t, n // group[3]].double()
                Z = torch.tanh(H @ W_n + torch.outer(k_t, v_t))
                H = f_t * H + (1 - f_t) * Z
                y[b, t, n] = q_t @ H
            final[b, n] = H
    return y, final


HEAD_LAYOUTS = {
    "all_84_style": (1, 1, 6, 6, 6),       # the paper's sharing: one q/k head for every state head
    "mixed_groups": (2, 3, 6, 1, 3),
    "no_sharing": (4, 4, 4, 4, 4),
}


@pytest.mark.parametrize("layout", HEAD_LAYOUTS)
@pytest.mark.parametrize("seq_len", [1, 7, 63])
def test_reference_matches_the_math_in_float64(layout, seq_len):
    generator = torch.Generator().manual_seed(seq_len)
    q, k, v, W, f = random_inputs(2, seq_len, HEAD_LAYOUTS[layout], 5, 3, generator=generator)
    num_heads = max(HEAD_LAYOUTS[layout])
    h0 = torch.rand(2, num_heads, 5, 3, dtype=torch.float64, generator=generator) * 2 - 1
    y, final = m2rnn_scan(q, k, v, W, f, initial_state=h0, backend="torch")
    y_ref, final_ref = naive_scan(q, k, v, W, f, h0)
    assert y.shape == (2, seq_len, num_heads, 3) and final.shape == (2, num_heads, 5, 3)
    assert relative_error(y, y_ref) < 1e-12
    assert relative_error(final, final_ref) < 1e-12


def test_state_stays_inside_the_unit_box():
    q, k, v, W, f = random_inputs(2, 40, (1, 1, 3, 3, 3), 4, 4, generator=torch.Generator().manual_seed(0))
    _, final = m2rnn_scan(q, 10 * k, 10 * v, 10 * W, f, backend="torch")
    assert final.abs().max() <= 1.0


def test_low_precision_inputs_keep_a_float32_state_and_return_their_dtype():
    q, k, v, W, f = random_inputs(1, 9, (1, 1, 2, 2, 2), 8, 4, dtype=torch.bfloat16)
    y, final = m2rnn_scan(q, k, v, W, f, backend="torch")
    assert y.dtype == torch.bfloat16 and final.dtype == torch.float32
    y_ref, final_ref = naive_scan(q, k, v, W, f)
    assert relative_error(final, final_ref) < 1e-6   # bf16 inputs, float32 arithmetic


def test_cu_seqlens_equals_running_each_sequence_alone():
    generator = torch.Generator().manual_seed(1)
    lengths = [3, 1, 5, 1]
    q, k, v, W, f = random_inputs(1, sum(lengths), (1, 1, 4, 4, 2), 6, 3, generator=generator)
    h0 = torch.rand(len(lengths), 4, 6, 3, dtype=torch.float64, generator=generator) - 0.5
    cu_seqlens = torch.tensor([0, 3, 4, 9, 10])
    y, final = m2rnn_scan(q, k, v, W, f, initial_state=h0, cu_seqlens=cu_seqlens, backend="torch")
    assert final.shape == (len(lengths), 4, 6, 3)
    for i, (start, end) in enumerate(zip(cu_seqlens[:-1], cu_seqlens[1:])):
        piece = slice(start, end)
        y_i, final_i = naive_scan(q[:, piece], k[:, piece], v[:, piece], W, f[:, piece], h0[i : i + 1])
        assert relative_error(y[:, piece], y_i) < 1e-12
        assert relative_error(final[i : i + 1], final_i) < 1e-12


@pytest.mark.parametrize("gradient_clipping", [None, 100.0])
def test_gradcheck_every_input(gradient_clipping):
    """A clip far above every gradient must leave the derivative exact."""
    generator = torch.Generator().manual_seed(2)
    q, k, v, W, f = random_inputs(2, 4, (1, 2, 2, 2, 1), 3, 2, generator=generator)
    h0 = torch.rand(2, 2, 3, 2, dtype=torch.float64, generator=generator) - 0.5
    inputs = [x.requires_grad_() for x in (q, k, v, W, f, h0)]

    def scan(q, k, v, W, f, h0):
        return m2rnn_scan(q, k, v, W, f, h0, gradient_clipping=gradient_clipping, backend="torch")

    assert torch.autograd.gradcheck(scan, inputs)


def test_gradcheck_with_cu_seqlens():
    generator = torch.Generator().manual_seed(3)
    q, k, v, W, f = random_inputs(1, 5, (1, 1, 2, 2, 2), 3, 2, generator=generator)
    h0 = torch.rand(3, 2, 3, 2, dtype=torch.float64, generator=generator) - 0.5
    cu_seqlens = torch.tensor([0, 1, 4, 5])
    inputs = [x.requires_grad_() for x in (q, k, v, W, f, h0)]
    assert torch.autograd.gradcheck(lambda *x: m2rnn_scan(*x, cu_seqlens=cu_seqlens, backend="torch"), inputs)


def test_gradient_clipping_clamps_the_whole_gradient_reaching_a_state():
    """One step: the gradient reaching H_1 is the sum of what y_1 and the final-state output send back;
    docs/design.md clamps that sum (not only the part from the next state) before it flows to H_0."""
    generator = torch.Generator().manual_seed(4)
    q, k, v, W, f = random_inputs(1, 1, (1, 1, 1, 1, 1), 4, 3, generator=generator)
    h0 = (torch.rand(1, 1, 4, 3, dtype=torch.float64, generator=generator) - 0.5).requires_grad_()
    grad_y = torch.randn(1, 1, 1, 3, dtype=torch.float64, generator=generator)
    grad_state = torch.randn(1, 1, 4, 3, dtype=torch.float64, generator=generator)
    clip = 0.3

    y, final = m2rnn_scan(q, k, v, W, f, initial_state=h0, gradient_clipping=clip, backend="torch")
    (grad_h0,) = torch.autograd.grad((y * grad_y).sum() + (final * grad_state).sum(), h0)

    total_at_h1 = grad_state[0, 0] + torch.outer(q[0, 0, 0], grad_y[0, 0, 0])
    assert (total_at_h1.abs() > clip).any(), "the test needs a gradient that the clip actually clamps"
    h0_leaf = h0.detach().requires_grad_()
    f_1 = f[0, 0, 0]
    h1 = f_1 * h0_leaf[0, 0] + (1 - f_1) * torch.tanh(h0_leaf[0, 0] @ W[0] + torch.outer(k[0, 0, 0], v[0, 0, 0]))
    (expected,) = torch.autograd.grad(h1, h0_leaf, grad_outputs=total_at_h1.clamp(-clip, clip))
    assert relative_error(grad_h0, expected) < 1e-12


def _bad_inputs():
    q, k, v, W, f = random_inputs(2, 5, (1, 1, 4, 4, 4), 6, 3, dtype=torch.float32)
    return dict(q=q, k=k, v=v, W=W, f=f)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda x: x.update(q=x["q"][0]), "`q` of shape"),
        (lambda x: x.update(k=x["k"][:, :4]), "`k` has (B, S)"),
        (lambda x: x.update(k=torch.randn(2, 5, 1, 7)), "key head dim"),
        (lambda x: x.update(W=torch.randn(4, 3, 2)), "`W` must be (Nw, V, V)"),
        (lambda x: x.update(v=torch.randn(2, 5, 3, 3)), "must divide N"),
        (lambda x: x.update(f=x["f"].bfloat16()), "`f` must be float32"),
        (lambda x: x.update(q=x["q"].half()), "share one dtype"),
        (lambda x: x.update(q=x["q"].int()), "`q` must be bfloat16"),
        (lambda x: x.update(initial_state=torch.zeros(2, 4, 3, 6)), "`initial_state` must have shape"),
        (lambda x: x.update(cu_seqlens=torch.tensor([0, 5])), "B must be 1"),
        (lambda x: x.update(gradient_clipping=-1.0), "`gradient_clipping` must be a positive"),
        (lambda x: x.update(backend="cuda"), "`backend` must be one of"),
    ],
)
def test_bad_input_raises_a_clear_value_error(change, message):
    inputs = _bad_inputs()
    change(inputs)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        m2rnn_scan(**inputs)


def test_cu_seqlens_that_do_not_cover_the_sequence_raise():
    inputs = {name: x[:1] if name != "W" else x for name, x in _bad_inputs().items()}
    with pytest.raises(ValueError, match="rise from 0 to S=5"):
        m2rnn_scan(**inputs, cu_seqlens=torch.tensor([0, 3, 4]))
