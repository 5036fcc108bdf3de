"""Parallelism across processes: recurrent layers split by heads through transformers' TP machinery."""

from .tensor_parallel import (
    GATED_DELTANET_STYLE,
    M2RNN_STYLE,
    check_tensor_parallel_degree,
    clip_grad_norm_,
    cut_to_local_heads,
    gather_full_tensors,
    is_split_by_heads,
)

__all__ = [
    "GATED_DELTANET_STYLE",
    "M2RNN_STYLE",
    "check_tensor_parallel_degree",
    "clip_grad_norm_",
    "cut_to_local_heads",
    "gather_full_tensors",
    "is_split_by_heads",
]
