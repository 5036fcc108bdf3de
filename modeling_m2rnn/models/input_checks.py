"""Checks of the model's inputs: an input that cannot work raises a ValueError naming the argument and the rule,
instead of an error deep inside a layer or a silently wrong answer. Checks that read tensor values are skipped under
torch.compile (they would break the graph); shape checks cost nothing there."""

import torch

from ..generation.cache import cache_batch_size, cached_tokens


def check_inputs(inputs_embeds: torch.Tensor, attention_mask, position_ids, cache) -> None:
    """inputs_embeds (B, S, hidden); attention_mask (B, past + S) of 0/1, or a dict / 4-D mask built by transformers;
    position_ids (B or 1, S) integers; cache: one that holds state for B rows, or none yet."""
    batch, seq_len = inputs_embeds.shape[:2]
    if batch == 0 or seq_len == 0:
        raise ValueError(f"the input is empty: (batch, seq_len) = {(batch, seq_len)}; give at least one token per row")
    cache_batch = cache_batch_size(cache)
    if cache_batch is not None and cache_batch != batch:
        raise ValueError(
            f"the cache holds the state of a batch of {cache_batch} rows, the input has {batch}: a cache continues "
            "the batch it was filled with; start a new cache for another batch"
        )
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() != 4:
        _check_attention_mask(attention_mask, batch, seq_len, cached_tokens(cache))
    if position_ids is not None:
        _check_position_ids(position_ids, batch, seq_len)


def _check_attention_mask(mask: torch.Tensor, batch: int, seq_len: int, past: int | None) -> None:
    if mask.dim() != 2 or mask.shape[0] != batch:
        raise ValueError(
            f"`attention_mask` must be (batch, seq_len) with batch = {batch} like the input, got shape "
            f"{tuple(mask.shape)} for an input of (batch, seq_len) = {(batch, seq_len)}"
        )
    if past is not None and mask.shape[1] != past + seq_len:
        covered = f"the {past} cached tokens and the {seq_len} new ones" if past else f"the {seq_len} input tokens"
        raise ValueError(
            f"`attention_mask` has length {mask.shape[1]} but must cover {covered}: {past + seq_len} (shape "
            f"{tuple(mask.shape)}, input (batch, seq_len) = {(batch, seq_len)})"
        )
    if not torch.compiler.is_compiling() and ((mask != 0) & (mask != 1)).any():
        raise ValueError(
            "`attention_mask` must hold only 0 (padding) and 1 (token); got values "
            f"{mask.unique().tolist()[:8]}: a weighted mask has no meaning for the recurrence"
        )


def _check_position_ids(position_ids: torch.Tensor, batch: int, seq_len: int) -> None:
    is_integer = isinstance(position_ids, torch.Tensor) and not (
        position_ids.is_floating_point() or position_ids.is_complex() or position_ids.dtype == torch.bool
    )
    if not is_integer:
        kind = position_ids.dtype if isinstance(position_ids, torch.Tensor) else type(position_ids).__name__
        raise ValueError(f"`position_ids` must be an integer tensor, got {kind}")
    if position_ids.dim() != 2 or position_ids.shape[0] not in (1, batch) or position_ids.shape[1] != seq_len:
        raise ValueError(
            f"`position_ids` must be (batch, seq_len) or (1, seq_len) = {(batch, seq_len)} or {(1, seq_len)}, "
            f"got {tuple(position_ids.shape)}"
        )
