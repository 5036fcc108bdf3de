"""Decode steps over the static cache replayed as CUDA graphs, with almost no host work per token.

transformers compiles generate's decode step with `mode="reduce-overhead"`: inductor's CUDA graphs, behind dynamo's
guards and the bookkeeping of cudagraph trees over hundreds of inputs. That host work per token is as long as the
step's kernels at batch 1, and generate waits for the GPU at every token, so the GPU idles through it. Here the step
is compiled without CUDA graphs and captured in a graph of its own; a replay copies the step's few input tensors into
the graph's and launches it.
"""

from collections import OrderedDict

import torch
import torch._inductor
from torch.utils._pytree import tree_flatten, tree_unflatten
from transformers import CompileConfig
from transformers.utils import ModelOutput

from .cache import CACHE_ARGUMENT_NAMES, M2RNNStaticCache

_WARMED_UP = "warmed up"   # a step that ran the compiled forward on this cache; the next one is captured


def graph_free_compile_kwargs(compile_config: CompileConfig) -> dict | None:
    """torch.compile's arguments for `compile_config` with its CUDA graphs taken out (DecodeGraphs captures them), or
    None where the config asks for no CUDA graphs or for another backend than inductor."""
    kwargs = compile_config.to_dict()
    mode, options = kwargs.pop("mode"), kwargs.pop("options") or {}
    if kwargs["backend"] != "inductor":
        return None
    options = {**(torch._inductor.list_mode_options(mode) if mode else {}), **options}
    if not options.get("triton.cudagraphs"):
        return None
    return {**kwargs, "options": {**options, "triton.cudagraphs": False}}


class CUDAGraphCapture:
    """Records `step(**kwargs)` in a CUDA graph, which runs none of its kernels: returns (replay, the outputs it
    writes).

    The graphs share one memory pool: they replay one at a time and their outputs are copied after each replay, so one
    graph's temporaries may take another's memory. And unlike `torch.cuda.graph`, a capture leaves the allocator's
    cache alone, so that the blocks of one generate's cache can serve the next one's, whose steps would then replay
    the same graph (whether the allocator hands the same blocks back is not guaranteed: a generate call that gets
    new addresses pays a capture).
    """

    def __init__(self):
        self.pool = None

    def __call__(self, step, kwargs: dict):
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()   # a capture needs a stream other than the default one
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            # thread_local: a streamer's or pipeline's thread may use CUDA while this one captures
            graph.capture_begin(self.pool, capture_error_mode="thread_local")
            try:
                outputs = step(**kwargs)
            finally:
                graph.capture_end()
        torch.cuda.current_stream().wait_stream(stream)
        return graph.replay, outputs


class DecodeGraphs:
    """What `M2RNNForCausalLM.get_compiled_call` hands generate on CUDA: the compiled forward, whose decode steps over
    an `M2RNNStaticCache` run as CUDA graphs.

    A graph bakes in the shapes of its inputs and the addresses of everything it reads and writes: the cache's
    tensors, updated in place, and the parameters. So the first decode step on a cache (generate builds one per call)
    runs the compiled forward, which compiles or warms it up; the second captures a graph for the cache's addresses,
    and later ones replay it. `check_model` drops the graphs when a parameter has moved or the config has changed
    (generate calls it once per call, through `get_compiled_call`). dynamo's guards are evaluated only where the
    compiled forward runs, not on a replay (nor at all for a new cache that lands at an earlier one's addresses, whose
    graph replays at once): a module attribute changed by hand, outside the config, goes unseen.
    Anything else (prefill chunks, gradients, other caches, outputs beyond tensors) runs the compiled forward.
    """

    def __init__(self, model: torch.nn.Module, compile_kwargs: dict, capture=None, max_graphs: int = 8):
        self.model = model
        self.compile_kwargs = compile_kwargs
        self.compiled_call = torch.compile(model.__call__, **compile_kwargs)
        self.capture = capture or CUDAGraphCapture()
        self.max_graphs = max_graphs
        self.capturable: dict[tuple, bool] = {}   # per shape signature: whether its outputs are tensors only
        self.steps: OrderedDict[tuple, object] = OrderedDict()   # per signature and cache: _WARMED_UP or its graph
        self.model_made_for = None

    def check_model(self) -> None:
        """Drop every graph and warm-up when a parameter has moved or the config has changed (another attention
        implementation, say): what the graphs and the compiled step were made for."""
        parameters = [(t.data_ptr(), t.dtype, t.shape) for t in (*self.model.parameters(), *self.model.buffers())]
        model = (parameters, repr(vars(self.model.config)))
        if model != self.model_made_for:
            self.capturable.clear()
            self.steps.clear()
            self.model_made_for = model

    def __call__(self, **kwargs):
        cache_name = next((name for name in CACHE_ARGUMENT_NAMES if kwargs.get(name) is not None), None)
        cache = kwargs.get(cache_name)
        inputs, spec = tree_flatten({name: value for name, value in kwargs.items() if name != cache_name})
        shapes = self._signature(inputs, spec, cache)
        if shapes is None or not self.capturable.get(shapes, True):
            return self.compiled_call(**kwargs)
        key = (shapes, *(t.data_ptr() for t in cache.tensors()))
        step = self.steps.get(key)
        if step is None:
            # The first step on a cache (generate builds one per call) runs the compiled step for real: it compiles,
            # tunes and recompiles there if it must, never inside a capture.
            outputs = self.compiled_call(**kwargs)
            self.capturable[shapes] = CapturedStep.can_capture(outputs, cache)
            self._remember(key, _WARMED_UP)
            return outputs
        if step is _WARMED_UP:
            step = CapturedStep(self.compiled_call, inputs, spec, cache_name, cache, self.capture)
            self._remember(key, step)
        self.steps.move_to_end(key)
        return step(inputs, cache)

    def _signature(self, inputs: list, spec, cache) -> tuple | None:
        """What a decode step over a prefilled M2RNNStaticCache without gradients compiles to, or None for any other
        call: the argument structure, the tensors' shapes, dtypes and devices, and the other arguments' values."""
        if torch.is_grad_enabled() or not isinstance(cache, M2RNNStaticCache):
            return None
        if not isinstance(cache.seen_tokens, torch.Tensor):   # not prefilled: the step would initialise the cache
            return None
        signature = [spec, self.model.training]
        for x in inputs:
            if isinstance(x, torch.Tensor):
                signature.append((x.shape, x.dtype, x.device))
            elif x is None or isinstance(x, (bool, int, float, str)):
                signature.append(x)
            else:
                return None
        return tuple(signature)

    def _remember(self, key: tuple, step) -> None:
        self.steps[key] = step
        while len(self.steps) > self.max_graphs:   # caches come and go: keep the latest graphs
            self.steps.popitem(last=False)

    def __deepcopy__(self, memo):
        return None   # graphs cannot be copied; a copied model builds its own at its first compiled generate


class CapturedStep:
    """One decode step's graph: the input tensors it reads and the output tensors it writes, at fixed addresses."""

    def __init__(self, call, inputs: list, spec, cache_name: str, cache, capture):
        self.inputs = [x.clone() if isinstance(x, torch.Tensor) else x for x in inputs]
        self.tensor_inputs = [i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor)]
        # the capture runs none of the step's kernels: the first call's replay is this step
        self.replay, outputs = capture(call, {**tree_unflatten(self.inputs, spec), cache_name: cache})
        self.output_type = type(outputs)
        self.outputs = {name: value for name, value in outputs.items() if isinstance(value, torch.Tensor)}
        self.cache_fields = {name for name, value in outputs.items() if value is cache}

    @staticmethod
    def can_capture(outputs, cache) -> bool:
        """Only tensors (besides the cache) can be handed out as copies after each replay."""
        return isinstance(outputs, ModelOutput) and all(
            isinstance(value, torch.Tensor) or value is cache for value in outputs.values()
        )

    def __call__(self, inputs: list, cache):
        for i in self.tensor_inputs:
            self.inputs[i].copy_(inputs[i])
        self.replay()
        # copies: the next replay overwrites the graph's outputs, which a caller may still hold
        outputs = {name: value.clone() for name, value in self.outputs.items()}
        return self.output_type(**outputs, **dict.fromkeys(self.cache_fields, cache))
