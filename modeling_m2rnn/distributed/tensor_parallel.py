"""Tensor parallelism by heads through transformers' TP machinery (docs/design.md, "Tensor parallelism").

The styles "m2rnn_heads" and "gated_deltanet_heads", registered with transformers' ParallelInterface on import and
named by the config's `base_model_tp_plan`, split a recurrent layer by heads, topology-independently: each block
of a parameter is split by its own head count (a block of one head shared by all is held whole, its gradient
summed across the ranks), the M2RNN gated norm's mean square is averaged over the ranks, and the layer's output
summed. The layer's parameters are plain tensors, cut to this rank's part once loaded (`cut_to_local_heads`) and
put back together for saving (`gather_full_tensors`): no DTensor placement describes a tensor whose blocks are
split differently.
"""

import contextlib
import dataclasses
import functools
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from transformers.distributed.tensor_parallel import ParallelInterface, TensorParallelLayer

from ..configuration.configuration_m2rnn import ATTENTION_LAYER, SPARSE_MLP

M2RNN_STYLE = "m2rnn_heads"
GATED_DELTANET_STYLE = "gated_deltanet_heads"
_M2RNN_HEAD_FIELDS = {   # the layer's attribute → the config field of its head count
    "num_q_heads": "m2rnn_num_q_heads",
    "num_k_heads": "m2rnn_num_k_heads",
    "num_v_heads": "m2rnn_num_v_heads",
    "num_f_heads": "m2rnn_num_f_heads",
    "num_g_heads": "m2rnn_num_g_heads",
}


def local_head_count(field: str, heads: int, tp_size: int, shareable: bool = True) -> int:
    """This rank's heads of a block of `heads` heads: heads / T, or all of a single head shared by every head."""
    if shareable and heads == 1:
        return 1
    if heads % tp_size:
        shared = " 1 (one head shared by all, held whole by every rank) or" if shareable else ""
        raise ValueError(
            f"`{field}` = {heads} must be{shared} divisible by the tensor-parallel degree {tp_size}: heads are "
            "split across the ranks whole"
        )
    return heads // tp_size


def check_tensor_parallel_degree(config, tp_size: int) -> None:
    """ValueError naming the field when `tp_size` ranks cannot split the heads (and expert widths) of every layer of
    `config`."""
    if "m2rnn" in config.mixer_types:
        local_head_count("N = the largest M2RNN head count", config.m2rnn_num_heads, tp_size, shareable=False)
        for field in (*_M2RNN_HEAD_FIELDS.values(), "m2rnn_num_weight_heads"):
            local_head_count(field, getattr(config, field), tp_size)
    if "gated_deltanet" in config.mixer_types:
        local_head_count("gdn_num_heads", config.gdn_num_heads, tp_size, shareable=False)
        local_head_count("gdn_num_k_heads", config.gdn_num_k_heads or config.gdn_num_heads, tp_size)
    if ATTENTION_LAYER in config.layer_types:
        local_head_count("num_attention_heads", config.num_attention_heads, tp_size, shareable=False)
        local_head_count("num_key_value_heads", config.num_key_value_heads, tp_size, shareable=False)
    if SPARSE_MLP in config.mlp_layer_types:
        # the experts' and the shared expert's intermediate widths are split like heads of width 1
        local_head_count("moe_intermediate_size", config.moe_intermediate_size, tp_size, shareable=False)
        if config.shared_expert_intermediate_size > 0:
            local_head_count("shared_expert_intermediate_size", config.shared_expert_intermediate_size, tp_size,
                             shareable=False)


@dataclasses.dataclass(frozen=True)
class HeadBlock:
    """`width` consecutive entries of a tensor along its split dimension, indexed by `heads` heads."""

    field: str        # names the head count in errors
    width: int
    heads: int
    shareable: bool = True   # a single head may be shared by all heads (held whole); else it must split

    @property
    def is_whole(self) -> bool:
        """Held whole by every rank: one head, shared by all heads."""
        return self.shareable and self.heads == 1

    def local_width(self, tp_size: int) -> int:
        return self.width if self.is_whole else self.width // tp_size


@dataclasses.dataclass(frozen=True)
class SplitTensor:
    """How a parameter is split by heads: its blocks, in order along dimension `dim`."""

    dim: int
    blocks: tuple[HeadBlock, ...]

    def local_ranges(self, rank: int, tp_size: int) -> list[tuple[int, int]]:
        """(start, end) of this rank's entries of each block, in the full tensor."""
        ranges, start = [], 0
        for block in self.blocks:
            width = block.local_width(tp_size)
            offset = 0 if block.is_whole else rank * width
            ranges.append((start + offset, start + offset + width))
            start += block.width
        return ranges

    def whole_ranges(self, tp_size: int) -> list[tuple[int, int]]:
        """(start, end) of the blocks every rank holds whole, in the local tensor, adjacent ones merged."""
        ranges, start = [], 0
        for block in self.blocks:
            width = block.local_width(tp_size)
            if block.is_whole:
                if ranges and ranges[-1][1] == start:
                    ranges[-1] = (ranges[-1][0], start + width)
                else:
                    ranges.append((start, start + width))
            start += width
        return ranges


def m2rnn_layout(mixer: nn.Module) -> dict[str, SplitTensor]:
    """The split of each parameter of an M2RNN layer (layers/m2rnn_mixer.py), from its full head counts."""
    key_dim, value_dim = mixer.key_head_dim, mixer.value_head_dim

    def block(attribute: str, head_width: int) -> HeadBlock:
        heads = getattr(mixer, attribute)
        return HeadBlock(_M2RNN_HEAD_FIELDS[attribute], heads * head_width, heads)

    q, k, v = block("num_q_heads", key_dim), block("num_k_heads", key_dim), block("num_v_heads", value_dim)
    f, g = block("num_f_heads", 1), block("num_g_heads", value_dim)
    num_weight_heads = mixer.W.shape[0]
    W = HeadBlock("m2rnn_num_weight_heads", num_weight_heads, num_weight_heads)

    def all_heads(width: int) -> HeadBlock:
        return HeadBlock("N = the largest M2RNN head count", width, mixer.num_heads, shareable=False)

    layout = {
        "in_proj.weight": SplitTensor(0, (q, k, v, f, g)),       # (Nq·K + Nk·K + Nv·V + Nf + Ng·V, hidden)
        "A_log": SplitTensor(0, (f,)),                            # (Nf,)
        "dt_bias": SplitTensor(0, (f,)),
        "W": SplitTensor(0, (W,)),                                # (Nw, V, V)
        "norm.weight": SplitTensor(0, (all_heads(mixer.num_heads * value_dim),)),        # (N·V,)
        "out_proj.weight": SplitTensor(1, (all_heads(mixer.num_heads * value_dim),)),    # (hidden, N·V)
    }
    if mixer.conv_kernel_size is not None:
        layout["conv_weight"] = SplitTensor(0, (q, k, v))         # (Nq·K + Nk·K + Nv·V, kernel)
    if mixer.D is not None:
        layout["D"] = SplitTensor(0, (all_heads(mixer.num_heads),))                      # (N, V)
    return layout


def _localise_m2rnn(mixer: nn.Module, tp_size: int, group) -> None:
    """Makes the layer's head counts this rank's and its norm average over the ranks."""
    for attribute in _M2RNN_HEAD_FIELDS:
        heads = getattr(mixer, attribute)
        setattr(mixer, attribute, 1 if heads == 1 else heads // tp_size)
    mixer.num_heads //= tp_size
    mixer.mean_over_head_shards = functools.partial(mean_across_ranks, group=group)


def gated_deltanet_layout(layer: nn.Module) -> dict[str, SplitTensor]:
    """The split of each parameter of a Gated DeltaNet layer (layers/gated_deltanet.py), from its full head counts.
    Its norm is per head, over V, with one weight shared by all heads: held whole, nothing to reduce."""
    key_dim, value_dim, heads, k_heads = layer.key_head_dim, layer.value_head_dim, layer.num_heads, layer.num_k_heads
    q = k = HeadBlock("gdn_num_k_heads", k_heads * key_dim, k_heads)
    per_head = HeadBlock("gdn_num_heads", heads, heads, shareable=False)
    values = HeadBlock("gdn_num_heads", heads * value_dim, heads, shareable=False)
    return {
        "qkv_proj.weight": SplitTensor(0, (q, k, values)),          # (2·Hk·K + H·V, hidden)
        "ab_proj.weight": SplitTensor(0, (per_head, per_head) + ((values,) if layer.use_gate else ())),
        "conv_weight": SplitTensor(0, (q, k, values)),               # (2·Hk·K + H·V, kernel)
        "A_log": SplitTensor(0, (per_head,)),                        # (H,)
        "dt_bias": SplitTensor(0, (per_head,)),
        "norm.weight": SplitTensor(0, (HeadBlock("the norm weight every head shares", value_dim, 1),)),   # (V,)
        "o_proj.weight": SplitTensor(1, (values,)),                  # (hidden, H·V)
    }


def _localise_gated_deltanet(layer: nn.Module, tp_size: int, group) -> None:
    """Makes the layer's head counts this rank's."""
    layer.num_heads //= tp_size
    layer.num_k_heads = 1 if layer.num_k_heads == 1 else layer.num_k_heads // tp_size


class _SumGradient(torch.autograd.Function):
    """Identity; the gradient is summed across the ranks (an input every rank uses for its own heads)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _SumGradientSlices(torch.autograd.Function):
    """Identity; the gradient's slices [start, end) along `dim` are summed across the ranks (the blocks of a
    parameter every rank holds whole)."""

    @staticmethod
    def forward(ctx, x, dim, ranges, group):
        ctx.dim, ctx.ranges, ctx.group = dim, ranges, group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        for start, end in ctx.ranges:
            piece = grad.narrow(ctx.dim, start, end - start).contiguous()
            dist.all_reduce(piece, group=ctx.group)
            grad.narrow(ctx.dim, start, end - start).copy_(piece)
        return grad, None, None, None


class _SumAcrossRanks(torch.autograd.Function):
    """The sum of each rank's partial output; its gradient is every rank's already."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _MeanAcrossRanks(torch.autograd.Function):
    """The mean over the ranks, which every rank then uses for its own heads: the gradient is averaged too."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x / dist.get_world_size(group)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad / dist.get_world_size(ctx.group), None


def mean_across_ranks(x: torch.Tensor, group) -> torch.Tensor:
    return _MeanAcrossRanks.apply(x, group)


@dataclasses.dataclass
class HeadSplit:
    """What a layer split by heads keeps on the module as `_head_split`: its parameters' splits and this rank."""

    layout: dict[str, SplitTensor]
    rank: int
    tp_size: int
    group: object
    is_cut: bool = False

    def cut(self, full: torch.Tensor, split: SplitTensor) -> torch.Tensor:
        """This rank's part of a full tensor, in a buffer of its own."""
        ranges = split.local_ranges(self.rank, self.tp_size)
        pieces = [full.narrow(split.dim, start, end - start) for start, end in ranges]
        return torch.cat(pieces, dim=split.dim)

    def gather(self, local: torch.Tensor, split: SplitTensor) -> torch.Tensor:
        """The full tensor from every rank's part (a collective: every rank calls it, in the same order)."""
        local = local.detach().contiguous()
        parts = [torch.empty_like(local) for _ in range(self.tp_size)]
        dist.all_gather(parts, local, group=self.group)
        pieces, start = [], 0
        for block in split.blocks:
            width = block.local_width(self.tp_size)
            ranks_parts = [local] if block.is_whole else parts
            pieces.extend(part.narrow(split.dim, start, width) for part in ranks_parts)
            start += width
        return torch.cat(pieces, dim=split.dim)


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, parameter = name.rpartition(".")
    return (module.get_submodule(path) if path else module), parameter


@contextlib.contextmanager
def _whole_blocks_sum_gradients(module: nn.Module, split: HeadSplit):
    """During the forward, each parameter with whole blocks is read through `_SumGradientSlices`."""
    swapped = []
    if torch.is_grad_enabled():
        for name, layout in split.layout.items():
            owner, parameter_name = _owner(module, name)
            parameter = owner._parameters.get(parameter_name)
            ranges = layout.whole_ranges(split.tp_size)
            if ranges and parameter is not None and parameter.requires_grad:
                owner._parameters[parameter_name] = _SumGradientSlices.apply(parameter, layout.dim, ranges, split.group)
                swapped.append((owner, parameter_name, parameter))
    try:
        yield
    finally:
        for owner, parameter_name, parameter in swapped:
            owner._parameters[parameter_name] = parameter


class HeadParallel(TensorParallelLayer):
    """The style of a recurrent layer split by heads (see the module's docstring). `layout` gives the split of each
    of the layer's parameters from its full head counts; `localise` makes the layer's head counts this rank's."""

    def __init__(self, layout: Callable[[nn.Module], dict[str, SplitTensor]],
                 localise: Callable[[nn.Module, int, object], None]):
        self.layout = layout
        self.localise = localise

    def install_forward(self, module: nn.Module, mesh, **kwargs):   # (later transformers also pass config=...)
        tp_size, group = mesh.size(), mesh.get_group()
        layout = self.layout(module)
        blocks = [block for split in layout.values() for block in split.blocks]
        for block in sorted(blocks, key=lambda block: block.shareable):   # N, the count of every head, first
            local_head_count(block.field, block.heads, tp_size, block.shareable)
        self.localise(module, tp_size, group)
        module._head_split = split = HeadSplit(layout, mesh.get_local_rank(), tp_size, group)
        original_forward = module.forward

        def forward(hidden_states, *args, **kwargs):
            if not split.is_cut:
                raise RuntimeError(f"{type(module).__name__} was split by heads but its parameters are still whole: "
                                   "load the model with from_pretrained(..., distributed_config=...)")
            hidden_states = _SumGradient.apply(hidden_states, group)
            with _whole_blocks_sum_gradients(module, split):
                output = original_forward(hidden_states, *args, **kwargs)
            return _SumAcrossRanks.apply(output, group)

        module.forward = forward
        return module


def cut_to_local_heads(model: nn.Module) -> None:
    """Replaces the whole (just loaded) parameters of every layer split by heads with this rank's part."""
    for module in model.modules():
        split = getattr(module, "_head_split", None)
        if split is None or split.is_cut:
            continue
        for name, layout in split.layout.items():
            owner, parameter_name = _owner(module, name)
            full = owner._parameters[parameter_name]
            local = nn.Parameter(split.cut(full.detach(), layout), requires_grad=full.requires_grad)
            local._is_hf_initialized = True
            owner._parameters[parameter_name] = local
        split.is_cut = True


def is_split_by_heads(model: nn.Module) -> bool:
    return any(getattr(module, "_head_split", None) is not None for module in model.modules())


def gather_full_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` named as in model.state_dict() (the parameters, or their gradients), each made whole: the parts of
    the layers split by heads put together and DTensors gathered. A collective: every rank calls it."""
    full = {name: tensor.full_tensor() if isinstance(tensor, DTensor) else tensor for name, tensor in tensors.items()}
    for prefix, module in model.named_modules():
        split = getattr(module, "_head_split", None)
        if split is None or not split.is_cut:
            continue
        for name, layout in split.layout.items():
            key = f"{prefix}.{name}" if prefix else name
            if full.get(key) is not None:
                full[key] = split.gather(full[key], layout)
    return full


ParallelInterface.register(M2RNN_STYLE, HeadParallel(m2rnn_layout, _localise_m2rnn))
ParallelInterface.register(GATED_DELTANET_STYLE, HeadParallel(gated_deltanet_layout, _localise_gated_deltanet))


def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)` (2-norm) for a model split across ranks: the
    norm of the whole model's gradient, the same on every rank (a collective: every rank calls it). Each rank's
    part of a split gradient (the layers split by heads, transformers' sharded DTensors) counts once summed over
    the ranks; a gradient every rank holds whole (replicated parameters, the whole blocks of a split layer) once.
    Returns the norm before clipping."""
    gradients = {id(p): p.grad for p in model.parameters() if p.grad is not None}
    split_parts, whole_parts = [], []
    for module in model.modules():
        split = getattr(module, "_head_split", None)
        if split is None or not split.is_cut:
            continue
        for name, layout in split.layout.items():
            owner, parameter_name = _owner(module, name)
            grad = gradients.pop(id(owner._parameters[parameter_name]), None)
            if grad is None:
                continue
            whole = torch.zeros(grad.shape[layout.dim], dtype=torch.bool, device=grad.device)
            for start, end in layout.whole_ranges(split.tp_size):
                whole[start:end] = True
            shape = [1] * grad.dim()
            shape[layout.dim] = -1
            whole = whole.view(shape).expand_as(grad)
            whole_parts.append(grad[whole])
            split_parts.append(grad[~whole])
    for grad in gradients.values():
        if isinstance(grad, DTensor):
            is_split = any(not placement.is_replicate() for placement in grad.placements)
            (split_parts if is_split else whole_parts).append(grad.to_local())
        else:
            whole_parts.append(grad)

    device = next(model.parameters()).device

    def sum_of_squares(parts: list[torch.Tensor]) -> torch.Tensor:
        return sum((part.float().pow(2).sum() for part in parts), torch.zeros((), device=device))

    split_squares = sum_of_squares(split_parts)
    dist.all_reduce(split_squares, group=_tensor_parallel_group(model))
    total_norm = (split_squares + sum_of_squares(whole_parts)).sqrt()
    scale = (max_norm / (total_norm + 1e-6)).clamp(max=1.0)
    for parameter in model.parameters():
        if parameter.grad is not None:
            grad = parameter.grad.to_local() if isinstance(parameter.grad, DTensor) else parameter.grad
            grad.mul_(scale.to(grad.dtype))
    return total_norm


def _tensor_parallel_group(model: nn.Module):
    """The process group of the model's tensor-parallel mesh (transformers keeps the mesh on the model)."""
    mesh = model._device_mesh
    return (mesh["tp"] if mesh.ndim > 1 else mesh).get_group()
