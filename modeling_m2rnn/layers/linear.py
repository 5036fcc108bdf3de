"""nn.Linear with a faster single-token product under torch.compile."""

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.symbolic_shapes import statically_known_true


class Linear(nn.Linear):
    """nn.Linear (same parameters, same checkpoints) whose product for a single row, when compiled, is written as
    a multiply-and-sum: inductor then emits one bandwidth-bound reduction kernel that reads the weight once.

    Batch-1 decoding is that case, and there cuBLAS's general matrix kernels take about twice as long as the
    reduction for the 400M model's products. Everything else (eager, several rows, shapes only known at run time,
    autocast) goes through F.linear unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._single_row_compiled(x):
            inference = not torch.is_grad_enabled()
            if inference:
                # Written once, rather than the ops that produce x (a norm, an activation) recomputed for every
                # block of output rows.
                x = _in_buffer(x)
            # (…, 1, in) · (out, in) summed over `in` in float32, the accumulation cuBLAS uses too
            y = (x.unsqueeze(-2).float() * self.weight.float()).sum(-1)
            if self.bias is not None:
                y = y + self.bias.float()
            y = y.to(x.dtype)
            # The cast then happens in the reduction kernel, and a consumer that needs a buffer (the conv step op)
            # takes a view of it instead of a copy of its part, one kernel less per consumer.
            return _in_buffer(y) if inference else y
        return F.linear(x, self.weight, self.bias)

    def forward_blocks(self, x: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, ...]:
        """forward(x).split(sizes, dim=-1), each block computed by a product of its own into a buffer of its own.

        A block whose width is not a multiple of 8 (16 bytes of bf16) leaves the rows of one shared buffer
        unaligned, and cuBLAS and inductor then fall back to slower kernels for every block. The single-row compiled
        product stays one product.
        """
        if self._single_row_compiled(x):
            return self(x).split(sizes, dim=-1)
        biases = self.bias.split(sizes) if self.bias is not None else [None] * len(sizes)
        return tuple(F.linear(x, weight, bias) for weight, bias in zip(self.weight.split(sizes), biases))

    def _single_row_compiled(self, x: torch.Tensor) -> bool:
        """Traced by torch.compile, one row known without a guard, and no autocast to change the dtypes."""
        return (
            torch.compiler.is_compiling()
            and statically_known_true(x.numel() == x.shape[-1])
            and x.dtype == self.weight.dtype
            and not torch.is_autocast_enabled(x.device.type)
        )


def _in_buffer(x: torch.Tensor) -> torch.Tensor:
    """x itself; under torch.compile, inductor writes it to a buffer of its own (its lowering of as_strided needs
    storage) instead of inlining its computation into every consumer."""
    return x.as_strided(x.size(), x.stride())
