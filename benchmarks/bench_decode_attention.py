"""One decode step of softmax attention over a static KV cache, as the hybrid's attention layers run it under
`cache_implementation="static"`: which attention kernel, and how long.

    PYTHONPATH=. python benchmarks/bench_decode_attention.py

Shapes of the 400M hybrid: 16 heads of 64, a cache of 16512 slots (16384 prompt + 128 new tokens), of which the
first `prompt` hold tokens and the rest are masked out. Every SDPA backend is timed, the eager formula compiled
by inductor, and compiled flex attention with a block mask of the filled slots (it skips the empty blocks of the
cache; the block mask is built once, outside the timing, where a model would build one per token), beside the floor
(K and V of the whole cache read once at 4.2 TB/s). Errors are relative to a float32 evaluation of the same formula.
"""

from contextlib import nullcontext

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from modeling_m2rnn.layers.attention import eager_attention_forward

CACHE_LEN, HEADS, HEAD_DIM = 16512, 16, 64
BACKENDS = {"sdpa (auto)": None, "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH,
            "cudnn": SDPBackend.CUDNN_ATTENTION}


class _Layer(torch.nn.Module):
    """What eager_attention_forward reads of an attention layer: one query head per key/value head, no dropout."""

    num_key_value_groups = 1


LAYER = _Layer().eval()


def eager(query, key, value, mask):
    return eager_attention_forward(LAYER, query, key, value, mask, HEAD_DIM**-0.5)[0]


def sdpa(backend):
    """SDPA on `backend`, or on the one torch picks (None)."""
    def attend(query, key, value, mask):
        with sdpa_kernel(backend) if backend is not None else nullcontext():
            return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask)
    return attend


def filled_slots_block_mask(batch: int, filled: int):
    """flex attention's block mask of a decode step that sees the first `filled` cache slots."""
    return create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx < filled, batch, None, 1, CACHE_LEN, device="cuda")


def main():
    compiled_eager = torch.compile(eager, dynamic=False)
    compiled_flex = torch.compile(flex_attention, dynamic=False)
    for batch in (1, 16):
        for prompt in (512, 16384):
            query, key, value = (torch.randn(batch, HEADS, length, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
                                 for length in (1, CACHE_LEN, CACHE_LEN))
            mask = torch.zeros(batch, 1, 1, CACHE_LEN, device="cuda", dtype=torch.bool)
            mask[..., :prompt] = True
            reference = eager(query.float(), key.float(), value.float(), mask).transpose(1, 2)
            row = {}
            kernels = {name: sdpa(backend) for name, backend in BACKENDS.items()}
            kernels["compiled eager"] = lambda *inputs: compiled_eager(*inputs).transpose(1, 2)
            block_mask = filled_slots_block_mask(batch, prompt)

            def flex(q, k, v, _mask, block_mask=block_mask):
                return compiled_flex(q, k, v, block_mask=block_mask)

            kernels["flex, compiled"] = flex
            for name, kernel in kernels.items():
                try:
                    out = kernel(query, key, value, mask)
                except Exception as error:   # a backend that does not take this case, or fails to compile
                    row[name] = repr(error)[:80]
                    continue
                error = ((out.float() - reference).norm() / reference.norm()).item()
                inputs = (query, key, value, mask)
                micros = 1e3 * triton.testing.do_bench(lambda kernel=kernel, inputs=inputs: kernel(*inputs), rep=200)
                row[name] = f"{micros:.1f} us (rel. error {error:.1e})"
            floor = 2 * batch * HEADS * CACHE_LEN * HEAD_DIM * 2 / 4.2e12 * 1e6
            print(f"B={batch} prompt={prompt} floor {floor:.1f} us: {row}", flush=True)


if __name__ == "__main__":
    main()
